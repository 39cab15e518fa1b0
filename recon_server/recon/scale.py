"""The one intensity scale per slice that training and reconstruction share (docs/ARCHITECTURE.md).

Each slice is divided by the 99th percentile of the coil-combined image of its fully sampled
centre rows alone (zero elsewhere), fastMRI's centre (:func:`centre_acs`), before the network and
multiplied back after, so that the network sees measured slices on its training slices' scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from recon_server.recon.fft import ifft2c

SCALE_QUANTILE = 0.99
DEFAULT_CENTER_FRACTION = 0.08


def centre_acs(ky: int, center_fraction: float = DEFAULT_CENTER_FRACTION) -> tuple[int, int]:
    """fastMRI's fully sampled centre ``(start, stop)`` for ``ky`` lines."""
    if not 0 < center_fraction <= 1:
        raise ValueError(f"center_fraction must be in (0, 1], got {center_fraction}")
    n = max(1, round(ky * center_fraction))
    start = (ky - n + 1) // 2
    return start, start + n


def slice_scale(
    calibration: Tensor, maps: Tensor, *, acs: tuple[int, int], quantile: float = SCALE_QUANTILE
) -> Tensor:
    """The project's one intensity scale per slice, ``(slices,)`` float32.

    ``calibration``: complex ``(slices, coils, acs_rows, kx)`` ACS k-space rows ``acs[0]:acs[1]``
    of a ``(ky, kx)`` grid; ``maps``: ``(slices, coils, ky, kx)`` coil maps. Returns
    ``quantile_r |sum_c conj(S_c(r)) (F^H Z y_acs)_c(r)|`` (``Z`` zero-fills the other rows),
    clamped away from zero. Divide images by it before the network, multiply after.
    """
    if calibration.ndim != 4 or maps.ndim != 4:
        raise ValueError(
            f"calibration and maps must be 4-D, got {tuple(calibration.shape)}, {tuple(maps.shape)}"
        )
    s, c, rows, kx = calibration.shape
    ky = maps.shape[-2]
    if acs[1] - acs[0] != rows or maps.shape[:2] != (s, c) or maps.shape[-1] != kx:
        calib_shape, maps_shape = tuple(calibration.shape), tuple(maps.shape)
        raise ValueError(f"calibration {calib_shape} with ACS rows {acs} does not match maps {maps_shape}")
    full = torch.zeros((s, c, ky, kx), dtype=torch.complex64, device=calibration.device)
    full[:, :, acs[0] : acs[1], :] = calibration.to(torch.complex64)
    low = (maps.conj().to(torch.complex64) * ifft2c(full)).sum(dim=1).abs()
    return torch.quantile(low.reshape(s, -1), quantile, dim=1).clamp_min(1e-20).to(torch.float32)
