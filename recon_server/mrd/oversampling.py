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
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np
import scipy.fft as sfft
import torch

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
        k = np.asarray(kspace, dtype=np.complex64)
        return _halve_readout(k[..., ::2], k[..., 1::2])
    img = sfft.ifft(kspace, axis=-1, norm="ortho", workers=workers)
    half = nx // 2
    cropped = np.concatenate([img[..., :half], img[..., full - half :]], axis=-1)
    out = sfft.fft(cropped, axis=-1, norm="ortho", workers=workers, overwrite_x=True)
    return np.asarray(out, dtype=np.complex64)


def _halve_readout(
    even: np.ndarray, odd: np.ndarray, buffers: tuple[torch.Tensor, torch.Tensor] | None = None
) -> np.ndarray:
    """The shift-free crop for the usual 2x oversampling from the even and odd samples (complex64).

    Splitting the ``2 nx``-point inverse transform into even and odd samples, the kept image
    points m in [-nx/2, nx/2) are ``E[m] + w^m O[m]`` (``E``, ``O``: the ``nx``-point inverse
    transforms of the even and odd samples, ``w = exp(2 pi i / 2nx)``). Transforming back, the
    even samples pass through unchanged and the odd ones are delayed by half a sample:
    ``out = (k_even + fft(w^m ifft(k_odd))) / sqrt(2)``. Two ``nx``-point transforms instead of
    one of ``2 nx`` and one of ``nx``: a third less work, and no copy for the crop.

    torch's (MKL) transforms are faster than scipy's here and write into ``buffers`` (two
    complex64 tensors of the output's shape; the result is a view of the second): a streaming
    caller reuses them instead of asking for fresh memory every batch.
    """
    nx = even.shape[-1]
    delayed, out = buffers if buffers is not None else (torch.empty(even.shape, dtype=torch.complex64), None)
    # Unscaled inverse transform: its 1/nx is folded into the delay factors (one pass less).
    torch.fft.ifft(torch.from_numpy(odd), dim=-1, norm="forward", out=delayed)
    delayed.mul_(_half_sample_delay(nx))
    out = torch.fft.fft(delayed, dim=-1, out=out)
    out.add_(torch.from_numpy(even), alpha=math.sqrt(0.5))
    return out.numpy()


@functools.cache
def _half_sample_delay(nx: int) -> torch.Tensor:
    """``w^m / (sqrt(2) nx)`` for the image points m in FFT order (0..nx/2-1, then -nx/2..-1)."""
    m = np.fft.fftfreq(nx, 1 / nx)  # even nx: the Nyquist point is -nx/2, as in the crop
    return torch.from_numpy((np.exp(1j * np.pi * m / nx) * np.sqrt(0.5) / nx).astype(np.complex64))


class StreamingCropper(Generic[T]):
    """Stages oversampled lines; each full batch is cropped and handed to ``place`` in one call.

    ``add(target, data, x0)`` places ``data`` (coils, samples) at column ``x0`` of a full-width
    staging row; when ``batch`` rows are staged they are transformed together and passed to
    ``place(targets, lines)`` with ``lines`` of shape (n, coils, nx), valid until the next batch.
    ``flush()`` does the same for the partial batch at the end of the scan. ``target`` is whatever
    ``place`` needs to put a line where it belongs. (A helper thread for the transforms was tried
    twice: on two cores, with the sender on one of them, it gained nothing measurable.)
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
        # The usual 2x case stages even and odd samples apart (staging (2, batch, coils, nx)), so
        # its transforms read contiguous memory, and works in two reused buffers (fresh memory
        # costs a page fault per page).
        self._halving = full_nx == 2 * nx and nx % 2 == 0
        self._batch = batch
        shape = (2, batch, channels, nx) if self._halving else (batch, channels, full_nx)
        self._staging = np.zeros(shape, np.complex64)
        self._targets: list[T] = []
        self._work = tuple(torch.zeros((batch, channels, nx), dtype=torch.complex64) for _ in range(2))

    def add(self, target: T, data: np.ndarray, x0: int) -> None:
        """Stage one line; a full batch is transformed and placed at once."""
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
        if len(self._targets) == self._batch:
            self.flush()

    def flush(self) -> None:
        """Transform and place every staged line."""
        n = len(self._targets)
        if not n:
            return
        if self._halving:
            even, odd = self._staging[:, :n]
            lines = _halve_readout(even, odd, (self._work[0][:n], self._work[1][:n]))
        else:
            lines = remove_readout_oversampling(self._staging[:n], self.nx, workers=1)
        self._place(self._targets, lines)
        self._targets = []
