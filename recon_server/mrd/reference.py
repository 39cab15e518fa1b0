"""A separate reference scan (its own ``<encoding>``) placed on the imaging scan's k-space grid.

Scanners with ``calibrationMode`` ``separate`` may measure the coil-calibration reference as a
scan of its own, before the imaging lines, with its own matrix and resolution: its readouts
carry ``encoding_space_ref`` 1 and the header's second ``<encoding>`` describes them. The coil
maps need that calibration on the imaging grid (the imaging k-space step ``1 / FOV``):

- same field of view (the usual case: a low-resolution block): the reference's k-space step is
  the imaging one, so its rows and columns are the central rows and columns of the imaging grid;
- another field of view: the reference's coil images are resampled (linear interpolation) onto
  the imaging pixels, zero outside the reference's field of view, and transformed back; only the
  rows inside the reference's k-space extent are kept.

The reference's readout oversampling is removed like the imaging scan's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.fft as sfft
from ismrmrd import xsd
from scipy import ndimage

from recon_server.mrd.oversampling import remove_readout_oversampling

#: Fields of view closer than this (relative) count as equal.
FOV_TOLERANCE = 0.01


class ReferenceReadout(Protocol):
    """What a reference readout needs to carry (``assemble._ReferenceLine``)."""

    @property
    def ky(self) -> int: ...
    @property
    def centre(self) -> int: ...
    @property
    def data(self) -> np.ndarray: ...


@dataclass(frozen=True)
class ReferenceSpace:
    """The reference scan's encoding: matrix, recon width, field of view, centre line."""

    enc_nx: int
    ny: int
    recon_nx: int
    fov_mm: tuple[float, float]
    centre_line: int


def e1_centre(encoding: xsd.encodingType, ny: int) -> int:
    """``encodingLimits.kspace_encoding_step_1.center``, or ``ny // 2`` when absent."""
    limits = encoding.encodingLimits
    e1 = getattr(limits, "kspace_encoding_step_1", None) if limits is not None else None
    return int(e1.center) if e1 is not None and e1.center is not None else ny // 2


def calibration_mode(encoding: xsd.encodingType) -> str:
    """``parallelImaging.calibrationMode`` (``embedded``, ``separate``, ...) or ``""``."""
    pi = encoding.parallelImaging
    mode = getattr(pi, "calibrationMode", None) if pi is not None else None
    return str(getattr(mode, "value", mode) or "").lower()


def reference_space(encoding: xsd.encodingType) -> ReferenceSpace:
    """The reference encoding's sizes, checked."""
    enc_nx, ny = int(encoding.encodedSpace.matrixSize.x), int(encoding.encodedSpace.matrixSize.y)
    recon_nx = int(encoding.reconSpace.matrixSize.x)
    fov = encoding.reconSpace.fieldOfView_mm
    if min(enc_nx, ny, recon_nx) < 1 or ny > 16384 or enc_nx > 65535 or recon_nx > enc_nx:
        raise ValueError(f"implausible reference encoding matrix {enc_nx} x {ny} (recon x {recon_nx})")
    if not (float(fov.x) > 0 and float(fov.y) > 0):
        raise ValueError(f"reference encoding field of view {fov.x} x {fov.y} mm is not positive")
    return ReferenceSpace(enc_nx, ny, recon_nx, (float(fov.x), float(fov.y)), e1_centre(encoding, ny))


def reference_kspace(
    lines: Sequence[ReferenceReadout], space: ReferenceSpace, *, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """The reference lines of one slice on their own grid: ``(coils, ny, recon_nx)`` and the
    measured rows ``(ny,)`` bool; repeated lines are averaged, oversampling removed."""
    grid = np.zeros((channels, space.ny, space.enc_nx), dtype=np.complex64)
    counts = np.zeros(space.ny, dtype=np.int32)
    offset = space.ny // 2 - space.centre_line
    for ref in lines:
        samples = ref.data.shape[-1]
        row = ref.ky + offset
        x0 = space.enc_nx // 2 - ref.centre if ref.centre else (space.enc_nx - samples) // 2
        if ref.data.shape[0] != channels or not 0 <= row < space.ny or x0 < 0 or x0 + samples > space.enc_nx:
            raise ValueError(
                f"reference readout (line {ref.ky}, {samples} samples, {ref.data.shape[0]} channels) "
                f"does not fit the reference encoding {space.enc_nx} x {space.ny} with {channels} channels"
            )
        grid[:, row, x0 : x0 + samples] += ref.data
        counts[row] += 1
    measured = counts > 0
    grid[:, measured, :] /= counts[measured][None, :, None]
    return remove_readout_oversampling(grid, space.recon_nx), measured


def _centred(size: int, into: int) -> tuple[slice, slice]:
    """Source and destination slices that centre an axis of ``size`` on one of ``into``."""
    lo_src = max(0, size // 2 - into // 2)
    lo_dst = max(0, into // 2 - size // 2)
    n = min(size - lo_src, into - lo_dst)
    return slice(lo_src, lo_src + n), slice(lo_dst, lo_dst + n)


def onto_imaging_grid(
    kspace: np.ndarray,
    measured: np.ndarray,
    space: ReferenceSpace,
    *,
    ny: int,
    nx: int,
    fov_mm: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Reference k-space ``(coils, ny_ref, nx_ref)`` -> ``(coils, ny, nx)`` on the imaging grid,
    and the imaging rows it fills (module docstring)."""
    coils = kspace.shape[0]
    out = np.zeros((coils, ny, nx), dtype=np.complex64)
    rows = np.zeros(ny, dtype=bool)
    same_fov = all(abs(a - b) <= FOV_TOLERANCE * b for a, b in zip(space.fov_mm, fov_mm, strict=True))
    if same_fov:
        src_y, dst_y = _centred(kspace.shape[1], ny)
        src_x, dst_x = _centred(kspace.shape[2], nx)
        out[:, dst_y, dst_x] = kspace[:, src_y, src_x]
        rows[dst_y] = measured[src_y]
        return out, rows
    # Another field of view: resample the reference's coil images onto the imaging pixels.
    images = sfft.fftshift(sfft.ifft2(sfft.ifftshift(kspace, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    ref_ny, ref_nx = kspace.shape[1:]
    yy = (np.arange(ny) - ny // 2) * (fov_mm[1] / ny) / (space.fov_mm[1] / ref_ny) + ref_ny // 2
    xx = (np.arange(nx) - nx // 2) * (fov_mm[0] / nx) / (space.fov_mm[0] / ref_nx) + ref_nx // 2
    coords = np.stack(np.meshgrid(yy, xx, indexing="ij"))
    # Orthonormal transforms of the same measured signal: an image pixel carries FOV / sqrt(n) of
    # the object per axis, so the reference's coil images are rescaled to the imaging grid's.
    gain = (
        (fov_mm[0] / space.fov_mm[0])
        * (fov_mm[1] / space.fov_mm[1])
        * math.sqrt((ref_ny * ref_nx) / (ny * nx))
    )
    for c in range(coils):
        re = ndimage.map_coordinates(images[c].real, coords, order=1, cval=0.0)
        im = ndimage.map_coordinates(images[c].imag, coords, order=1, cval=0.0)
        out[c] = (re + 1j * im) * gain
    out = sfft.fftshift(sfft.fft2(sfft.ifftshift(out, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    # Rows inside the reference's k-space extent (its measured rows, scaled by the FOV ratio).
    ratio = fov_mm[1] / space.fov_mm[1]
    idx = np.flatnonzero(measured)
    lo = math.ceil((idx.min() - ref_ny // 2) * ratio) + 1 + ny // 2
    hi = math.floor((idx.max() - ref_ny // 2) * ratio) - 1 + ny // 2
    rows[max(lo, 0) : max(min(hi + 1, ny), 0)] = True
    return out.astype(np.complex64), rows
