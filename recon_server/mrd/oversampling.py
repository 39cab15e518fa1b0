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

from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np
import scipy.fft as sfft

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
    img = sfft.ifft(kspace, axis=-1, norm="ortho", workers=workers)
    half = nx // 2
    cropped = np.concatenate([img[..., :half], img[..., full - half :]], axis=-1)
    out = sfft.fft(cropped, axis=-1, norm="ortho", workers=workers, overwrite_x=True)
    return np.asarray(out, dtype=np.complex64)


class StreamingCropper(Generic[T]):
    """Stages oversampled lines; each full batch is cropped and handed to ``place`` in one call.

    ``add(target, data, x0)`` places ``data`` (coils, samples) at column ``x0`` of a full-width
    staging row; when ``batch`` rows are staged they are transformed together and passed to
    ``place(targets, lines)`` with ``lines`` of shape (n, coils, nx). ``flush()`` does the same for
    the partial batch at the end of the scan. ``target`` is whatever ``place`` needs to put a line
    where it belongs. (A helper thread for the transforms was tried: on two cores it lost more to
    interpreter-lock hand-offs than it gained.)
    """

    def __init__(
        self,
        channels: int,
        full_nx: int,
        nx: int,
        place: Callable[[list[T], np.ndarray], None],
        *,
        batch: int = 64,
    ) -> None:
        if not 0 < nx < full_nx:
            raise ValueError(f"cannot crop a readout of {full_nx} to {nx}")
        self.nx = nx
        self._place = place
        self._staging = np.zeros((batch, channels, full_nx), np.complex64)
        self._targets: list[T] = []

    def add(self, target: T, data: np.ndarray, x0: int) -> None:
        """Stage one line; a full batch is transformed and placed at once."""
        row = self._staging[len(self._targets)]
        if data.shape[-1] != row.shape[-1]:
            row[...] = 0  # partial readout (asymmetric echo): the rest of the row stays empty
        row[:, x0 : x0 + data.shape[-1]] = data
        self._targets.append(target)
        if len(self._targets) == self._staging.shape[0]:
            self.flush()

    def flush(self) -> None:
        """Transform and place every staged line."""
        if self._targets:
            batch = self._staging[: len(self._targets)]
            self._place(self._targets, remove_readout_oversampling(batch, self.nx, workers=1))
            self._targets = []
