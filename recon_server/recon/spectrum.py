"""The image's power spectrum estimated from its own measured k-space (for CG-SENSE's Wiener penalty).

With unit-energy coil maps (``sum_c |S_c|^2 = 1``) the coils' k-space powers add up to the
image's spectrum, blurred by the coils' narrow k-space support: ``sum_c E|y_c(k)|^2 =
P(k) + coils sigma^2``. :func:`signal_spectrum` averages ``sum_c |y_c|^2`` over rings of equal
spatial frequency (an isotropic spectrum, square pixels assumed), only where k-space was
measured (every ring of an equispaced or random Cartesian mask has measured samples), subtracts
the noise and floors the result at :data:`SPECTRUM_FLOOR` times the noise power of one sample.
Rings without a measured sample (e.g. elliptical scanning's corners) get the floor.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from recon_server.recon.sense import as_mask

__all__ = ["RING_WIDTH", "SPECTRUM_FLOOR", "signal_spectrum"]

#: The width of one ring of equal spatial frequency, in k-space samples of the larger axis.
RING_WIDTH = 2.0
#: Floor of the estimated spectrum, in units of the noise power of one k-space sample: bounds the
#: Wiener penalty (``sigma^2 / P <= 1 / floor``) where the subtraction leaves nothing.
SPECTRUM_FLOOR = 0.05


def _rings(ky: int, kx: int, device: torch.device) -> tuple[Tensor, int]:
    """The ring index of every k-space sample ``(ky * kx,)`` and the number of rings."""
    fy = (torch.arange(ky, device=device, dtype=torch.float32) - ky // 2) / ky
    fx = (torch.arange(kx, device=device, dtype=torch.float32) - kx // 2) / kx
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) * max(ky, kx) / RING_WIDTH
    index = radius.floor().long().flatten()
    return index, int(index.max()) + 1


def signal_spectrum(kspace: Tensor, mask: Tensor | np.ndarray, sigma: Tensor) -> Tensor:
    """``P(k)`` ``(slices, ky, kx)``: the expected ``|F x|^2`` of the coil-combined image, in the
    units of ``kspace`` squared (module docstring).

    ``kspace`` ``(slices, coils, ky, kx)``, zeros where not measured; ``mask`` as
    :func:`recon_server.recon.sense.as_mask` takes it; ``sigma`` ``(slices,)`` or broadcastable,
    the noise standard deviation of one complex k-space sample.
    """
    s, coils, ky, kx = kspace.shape
    measured = as_mask(mask, s, ky, kx, device=kspace.device)[:, 0].expand(s, ky, kx).flatten(1)
    noise_power = sigma.to(device=kspace.device, dtype=torch.float32).reshape(-1, 1).expand(s, 1) ** 2
    power = kspace.abs().square().sum(dim=1).flatten(1).float() * measured  # (slices, ky * kx)
    index, count = _rings(ky, kx, kspace.device)
    ring_power = torch.zeros(s, count, device=kspace.device).index_add_(1, index, power)
    ring_samples = torch.zeros(s, count, device=kspace.device).index_add_(1, index, measured)
    floor = SPECTRUM_FLOOR * noise_power + torch.finfo(torch.float32).tiny
    profile = ring_power / ring_samples.clamp_min(1.0) - coils * noise_power
    profile = torch.where(ring_samples > 0, profile.maximum(floor), floor)
    return profile[:, index].reshape(s, ky, kx)
