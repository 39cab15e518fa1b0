"""Readout-oversampling removal: in bulk, and streamed over lines as they arrive.

Scanners sample the readout at twice the field of view (encodedSpace x = 2 x reconSpace x) to
keep the anti-aliasing filter's edges out of the image. Removing it is
``k -> ifftc_x -> keep the central nx columns -> fftc_x`` (centred, orthonormal), the job of
Gadgetron's RemoveROOversamplingGadget.

:class:`StreamingCropper` does it the way that gadget does, while the scan is still arriving: lines
are staged and transformed in small batches, so at the end of the scan only the last partial
batch is left (short latency from the last line to the reconstruction) and the stored k-space is
already at the reconstruction width (half the memory). Only acquired lines are transformed: an
undersampled scan costs proportionally less.
"""

from __future__ import annotations

import functools
import math
from typing import Generic, TypeVar

import numpy as np
import scipy.fft as sfft

from recon_server.mrd.buffers import POOL

T = TypeVar("T")


def remove_readout_oversampling(kspace: np.ndarray, nx: int, *, workers: int = -1) -> np.ndarray:
    """Crop the readout (last axis) to ``nx`` points of image space, keeping k-space units.

    For even lengths the four centring shifts cancel: shifting the input by N/2 multiplies the
    image by (-1)^m, and that sign, after the crop, shifts the output spectrum by nx/2, undoing the
    output shift. So ``fft(concat(y[:nx/2], y[-nx/2:]))`` with ``y = ifft(k)`` is exact and
    saves four copies of the data.
    """
    full = kspace.shape[-1]
    if nx >= full:
        return kspace
    # scipy.fft keeps complex64 (numpy.fft would compute in complex128).
    if full % 2 or nx % 2:
        img = sfft.fftshift(
            sfft.ifft(sfft.ifftshift(kspace, axes=-1), axis=-1, norm="ortho", workers=workers), axes=-1
        )
        start = (full - nx) // 2
        img = sfft.ifftshift(img[..., start : start + nx], axes=-1)
        out = sfft.fftshift(sfft.fft(img, axis=-1, norm="ortho", workers=workers), axes=-1)
        return np.asarray(out, dtype=np.complex64)
    if full == 2 * nx:
        return _halve_readout(kspace[..., ::2], kspace[..., 1::2], workers=workers)
    img = sfft.ifft(kspace, axis=-1, norm="ortho", workers=workers)
    half = nx // 2
    cropped = np.concatenate([img[..., :half], img[..., full - half :]], axis=-1)
    out = sfft.fft(cropped, axis=-1, norm="ortho", workers=workers, overwrite_x=True)
    return np.asarray(out, dtype=np.complex64)


def _halve_readout(
    even: np.ndarray, odd: np.ndarray, *, in_place: bool = False, workers: int = 1
) -> np.ndarray:
    """The shift-free crop for the usual 2x oversampling from the even and odd samples.

    Splitting the ``2 nx``-point inverse transform into even and odd samples, the kept image
    points m in [-nx/2, nx/2) are ``E[m] + w^m O[m]`` (``E``, ``O``: the ``nx``-point inverse
    transforms of the even and odd samples, ``w = exp(2 pi i / 2nx)``). Transforming back, the
    even samples pass through unchanged and the odd ones are delayed by half a sample:
    ``out = (k_even + fft(w^m ifft(k_odd))) / sqrt(2)``. Two ``nx``-point transforms instead of
    one of ``2 nx`` and one of ``nx``: a third less work, and no copy for the crop.

    ``in_place``: ``even`` and ``odd`` are contiguous complex64 scratch (a streaming caller's
    staging buffers): the result is computed in ``odd`` without asking for fresh memory.
    """
    nx = even.shape[-1]
    if not in_place:
        even, odd = np.array(even, dtype=np.complex64), np.array(odd, dtype=np.complex64)
    # Unscaled inverse transform: its 1/nx is folded into the delay factors (one pass less).
    # overwrite_x on contiguous complex64 input: scipy transforms in place.
    out = sfft.ifft(odd, axis=-1, norm="forward", workers=workers, overwrite_x=True)
    out *= _half_sample_delay(nx)
    out = sfft.fft(out, axis=-1, workers=workers, overwrite_x=True)
    even *= np.float32(math.sqrt(0.5))
    out += even
    return out


@functools.cache
def _half_sample_delay(nx: int) -> np.ndarray:
    """``w^m / (sqrt(2) nx)`` for the image points m in FFT order (0..nx/2-1, then -nx/2..-1)."""
    m = np.fft.fftfreq(nx, 1 / nx)  # even nx: the Nyquist point is -nx/2, as in the crop
    return (np.exp(1j * np.pi * m / nx) * np.sqrt(0.5) / nx).astype(np.complex64)


class StreamingCropper(Generic[T]):
    """Stages oversampled lines and crops them a batch at a time.

    ``add(target, data, x0)`` stages ``data`` (coils, samples) at column ``x0`` of a full-width
    row; when ``batch`` rows are staged they are transformed together and ``add`` returns
    ``(targets, lines)`` with ``lines`` of shape (n, coils, nx), valid until the next batch (else
    None). ``flush()`` does the same for the partial batch at the end of the scan. ``target`` is
    whatever the caller needs to put a line where it belongs. (A helper thread for the transforms
    was tried three times; on two cores, with the sender on one of them, the best of 25 scans did
    not improve and the median by 0 to 10%: not worth a thread per scan.)
    """

    def __init__(
        self,
        channels: int,
        full_nx: int,
        nx: int,
        *,
        batch: int = 64,
    ) -> None:
        if not 0 < nx < full_nx:
            raise ValueError(f"cannot crop a readout of {full_nx} to {nx}")
        self.nx = nx
        # The usual 2x case stages even and odd samples apart (staging (2, batch, coils, nx)), so
        # its transforms read contiguous memory and work in place there.
        self._halving = full_nx == 2 * nx and nx % 2 == 0
        self._batch = batch
        shape = (2, batch, channels, nx) if self._halving else (batch, channels, full_nx)
        self._staging = POOL.zeros(shape)
        self._targets: list[T] = []

    def add(self, target: T, data: np.ndarray, x0: int) -> tuple[list[T], np.ndarray] | None:
        """Stage one line; return the cropped batch when this line completed one."""
        i, samples = len(self._targets), data.shape[-1]
        if not self._halving:
            row = self._staging[i]
            if samples != row.shape[-1]:
                row[...] = 0  # partial readout (asymmetric echo): the rest of the row stays empty
            row[:, x0 : x0 + samples] = data
        else:
            if samples != 2 * self.nx:
                self._staging[:, i] = 0
            # Column x0 + j of the full row is sample (x0 + j) // 2 of the even (0) or odd (1) half.
            first, second = x0 % 2, 1 - x0 % 2
            self._staging[first, i, :, x0 // 2 : x0 // 2 + (samples + 1) // 2] = data[:, 0::2]
            self._staging[second, i, :, (x0 + 1) // 2 : (x0 + 1) // 2 + samples // 2] = data[:, 1::2]
        self._targets.append(target)
        return self.flush() if len(self._targets) == self._batch else None

    def flush(self) -> tuple[list[T], np.ndarray] | None:
        """Crop every staged line: ``(targets, lines)``, or None when nothing is staged."""
        targets, n = self._targets, len(self._targets)
        if not n:
            return None
        self._targets = []
        if self._halving:
            even, odd = self._staging[:, :n]
            return targets, _halve_readout(even, odd, in_place=True)
        return targets, remove_readout_oversampling(self._staging[:n], self.nx, workers=1)
