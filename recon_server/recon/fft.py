"""Centred orthonormal 2-D FFTs over the last two axes.

Convention (docs/ARCHITECTURE.md, docs/recon.md): k-space and images are both centred, i.e. the
DC sample sits at index ``n // 2`` of each of the last two axes, and the transform is unitary:

    fft2c(x)  = fftshift(fft2(ifftshift(x), norm="ortho"))
    ifft2c(k) = fftshift(ifft2(ifftshift(k), norm="ortho"))

so ``ifft2c(fft2c(x)) == x`` and ``||fft2c(x)|| == ||x||`` (Parseval). Works for any leading batch
shape, on the device and dtype of the input.

For even sizes the shifts are done without ``roll`` (which copies through ``cat`` and costs more
than the FFT itself on the CPU): with ``D = diag((-1)^n)``, ``fftshift(fft(ifftshift(x))) =
(-1)^(N/2) D fft(D x)`` (and the same for the inverse), i.e. two sign flips by a checkerboard.
Odd sizes use ``roll``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_DIMS = (-2, -1)


def _checkerboard(ny: int, nx: int, x: Tensor) -> Tensor:
    """``(-1)^(y + x)`` times ``(-1)^(ny/2 + nx/2)`` (once), as a real tensor ``(ny, nx)``."""
    real = x.real.dtype if x.is_complex() else x.dtype
    sy = 1 - 2 * (torch.arange(ny, device=x.device) % 2)
    sx = 1 - 2 * (torch.arange(nx, device=x.device) % 2)
    board = (sy[:, None] * sx[None, :]).to(real)
    return board


def _centred(x: Tensor, inverse: bool) -> Tensor:
    ny, nx = x.shape[-2], x.shape[-1]
    transform = torch.fft.ifft2 if inverse else torch.fft.fft2
    if ny % 2 or nx % 2:
        shifted = torch.fft.ifftshift(x, dim=_DIMS)
        return torch.fft.fftshift(transform(shifted, norm="ortho"), dim=_DIMS)
    board = _checkerboard(ny, nx, x)
    if (ny // 2 + nx // 2) % 2:
        return transform(x * board, norm="ortho") * (-board)
    return transform(x * board, norm="ortho") * board


def fft2c(x: Tensor) -> Tensor:
    """Centred unitary forward 2-D FFT over the last two axes (image -> k-space)."""
    return _centred(x, inverse=False)


def ifft2c(x: Tensor) -> Tensor:
    """Centred unitary inverse 2-D FFT over the last two axes (k-space -> image)."""
    return _centred(x, inverse=True)
