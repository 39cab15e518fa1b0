"""Multi-coil Cartesian SENSE operator ``A x = M F (S x)``, its adjoint and normal operator.

Shapes (docs/ARCHITECTURE.md): coil maps ``S`` are complex ``(slices, coils, ky, kx)``; images
``x`` are ``(slices, ky, kx)`` (optionally with extra leading batch axes, ``(..., slices, ky, kx)``,
which broadcast against the maps); k-space ``y`` is ``(..., slices, coils, ky, kx)``. ``F`` is the
centred unitary 2-D FFT (:mod:`recon_server.recon.fft`) and ``M`` the sampling mask, real, 1 where a
sample was acquired (a float mask acts as a diagonal weighting; ``M^H = M``).

    forward:  y = M F (S x)                      (coil images -> masked k-space)
    adjoint:  x = sum_c conj(S_c) F^H (M y_c)
    normal:   A^H A x = sum_c conj(S_c) F^H (M^2 F (S_c x))

Everything runs on the device of ``maps`` (CPU or CUDA); the mask is moved there once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from recon_server.recon.fft import fft2c, ifft2c

__all__ = ["SenseOperator", "as_mask"]


def as_mask(mask: Tensor | np.ndarray, slices: int, ky: int, kx: int, *, device: torch.device) -> Tensor:
    """Bring a sampling mask to a real float32 tensor ``(slices or 1, 1, ky, kx)`` on ``device``.

    Accepts ``(ky, kx)``, ``(slices, ky, kx)`` or ``(slices or 1, 1, ky, kx)``, bool or real.
    """
    m = torch.as_tensor(mask, device=device)
    if m.is_complex():
        raise ValueError(f"mask must be bool or real, got dtype {m.dtype}")
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1 or m.shape[-2:] != (ky, kx) or m.shape[0] not in (1, slices):
        raise ValueError(
            f"mask shape {tuple(torch.as_tensor(mask).shape)} does not match k-space "
            f"(slices={slices}, ky={ky}, kx={kx}); expected (ky, kx), (slices, ky, kx) or (slices, 1, ky, kx)"
        )
    return m.to(torch.float32)


class SenseOperator:
    """The SENSE forward model ``A = M F S`` for a batch of slices (see module docstring).

    Parameters
    ----------
    maps:
        complex ``(slices, coils, ky, kx)`` coil sensitivities (complex64 recommended).
    mask:
        bool/real ``(ky, kx)``, ``(slices, ky, kx)`` or ``(slices, 1, ky, kx)`` sampling mask.
    """

    def __init__(self, maps: Tensor, mask: Tensor | np.ndarray) -> None:
        if not isinstance(maps, Tensor) or maps.ndim != 4:
            shape = tuple(getattr(maps, "shape", ()))
            raise ValueError(f"maps must be a tensor (slices, coils, ky, kx), got shape {shape}")
        if not maps.is_complex():
            raise ValueError(f"maps must be complex, got dtype {maps.dtype}")
        self.maps = maps
        slices, _, ky, kx = maps.shape
        self.mask = as_mask(mask, slices, ky, kx, device=maps.device)
        self._mask2 = self.mask * self.mask

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(slices, ky, kx)`` of the images this operator acts on."""
        s, _, ky, kx = self.maps.shape
        return (s, ky, kx)

    @property
    def kspace_shape(self) -> tuple[int, int, int, int]:
        """``(slices, coils, ky, kx)`` of the k-space this operator produces."""
        s, c, ky, kx = self.maps.shape
        return (s, c, ky, kx)

    def _check_image(self, x: Tensor) -> None:
        if x.ndim < 3 or tuple(x.shape[-3:]) != self.image_shape:
            raise ValueError(f"image must have shape (..., {self.image_shape}), got {tuple(x.shape)}")

    def _check_kspace(self, y: Tensor) -> None:
        if y.ndim < 4 or tuple(y.shape[-4:]) != self.kspace_shape:
            raise ValueError(f"k-space must have shape (..., {self.kspace_shape}), got {tuple(y.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """``y = M F (S x)``: ``(..., slices, ky, kx)`` -> ``(..., slices, coils, ky, kx)``."""
        self._check_image(x)
        return self.mask * fft2c(self.maps * x.unsqueeze(-3))

    def adjoint(self, y: Tensor) -> Tensor:
        """``x = S^H F^H M y``: ``(..., slices, coils, ky, kx)`` -> ``(..., slices, ky, kx)``."""
        self._check_kspace(y)
        return (self.maps.conj() * ifft2c(self.mask * y)).sum(dim=-3)

    def normal(self, x: Tensor) -> Tensor:
        """``A^H A x`` without forming ``A``: ``(..., slices, ky, kx)`` -> same shape."""
        self._check_image(x)
        return (self.maps.conj() * ifft2c(self._mask2 * fft2c(self.maps * x.unsqueeze(-3)))).sum(dim=-3)

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    @property
    def H(self) -> _AdjointSense:  # noqa: N802 - the usual name for the adjoint
        """The adjoint operator ``A^H`` as an object (its ``forward`` is :meth:`adjoint`)."""
        return _AdjointSense(self)


class _AdjointSense:
    """``A^H`` of a :class:`SenseOperator`: ``forward`` maps k-space to images; ``.H`` gives ``A`` back."""

    def __init__(self, op: SenseOperator) -> None:
        self._op = op

    def forward(self, y: Tensor) -> Tensor:
        return self._op.adjoint(y)

    def adjoint(self, x: Tensor) -> Tensor:
        return self._op.forward(x)

    def normal(self, y: Tensor) -> Tensor:
        """``A A^H y``."""
        return self._op.forward(self._op.adjoint(y))

    def __call__(self, y: Tensor) -> Tensor:
        return self.forward(y)

    @property
    def H(self) -> SenseOperator:  # noqa: N802
        return self._op
