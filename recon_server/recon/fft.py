"""Centred orthonormal 2-D FFTs over the last two axes.

Convention (docs/ARCHITECTURE.md, docs/recon.md): k-space and images are both centred, i.e. the
DC sample sits at index ``n // 2`` of each of the last two axes, and the transform is unitary:

    fft2c(x)  = fftshift(fft2(ifftshift(x), norm="ortho"))
    ifft2c(k) = fftshift(ifft2(ifftshift(k), norm="ortho"))

so ``ifft2c(fft2c(x)) == x`` and ``||fft2c(x)|| == ||x||`` (Parseval). Works for any leading batch
shape, on the device and dtype of the input.
"""

from __future__ import annotations

import torch
from torch import Tensor

_DIMS = (-2, -1)


def fft2c(x: Tensor) -> Tensor:
    """Centred unitary forward 2-D FFT over the last two axes (image -> k-space)."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=_DIMS), norm="ortho"), dim=_DIMS)


def ifft2c(x: Tensor) -> Tensor:
    """Centred unitary inverse 2-D FFT over the last two axes (k-space -> image)."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(x, dim=_DIMS), norm="ortho"), dim=_DIMS)
