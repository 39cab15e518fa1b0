"""Image quality metrics on magnitude images: NRMSE, PSNR, SSIM.

Conventions (docs/recon.md; identical in evaluation, training validation and benchmarks):

- Both inputs are magnitude images (complex inputs are converted with ``abs``): the
  *reference* is the magnitude of the ground-truth complex image. 2-D ``(rows, cols)`` or a
  volume/batch ``(slices, rows, cols)``; numpy arrays or torch tensors (any device).
- ``mask`` (optional, bool, same shape or ``(rows, cols)`` broadcast over slices): a foreground
  (e.g. brain) mask; errors are taken over the mask pixels only.
- ``fit_scale`` (optional): the reconstruction is first multiplied by the real scalar
  ``a = <r, t> / <r, r>`` (over the mask) minimising ``||a r - t||``, for methods whose overall
  scale differs from the reference's.
- NRMSE ``= ||r - t|| / ||t||`` over the whole volume (or the mask).
- PSNR ``= 20 log10(max(t) / sqrt(mean((r - t)^2)))``: data range = maximum of the whole
  reference magnitude (all slices, also when a mask is given), MSE over the volume (or mask).
- SSIM: scikit-image's ``structural_similarity`` definition: 7x7 uniform window, ``K1 = 0.01``,
  ``K2 = 0.03``, sample covariance (``N/(N-1)``), ``data_range = max(t)``, the mean of the SSIM
  map after cropping the 3-pixel border. Volumes: 2-D SSIM per slice (never 3-D windows) with
  the volume's data range, averaged over all slices' map pixels (or the mask pixels inside the
  cropped region).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

__all__ = ["nrmse", "psnr", "ssim"]

Array = np.ndarray | torch.Tensor


def _magnitude(x: Array, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must be (rows, cols) or (slices, rows, cols), got shape {arr.shape}")
    mag = np.abs(arr).astype(np.float64)
    if not np.isfinite(mag).all():
        raise ValueError(f"{name} contains NaN or inf")
    return mag


def _prepare(
    recon: Array, reference: Array, mask: Array | None, fit_scale: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Magnitudes ``(slices, rows, cols)`` of recon (scaled if asked) and reference, and the mask."""
    r = _magnitude(recon, "recon")
    t = _magnitude(reference, "reference")
    if r.shape != t.shape:
        raise ValueError(f"recon shape {r.shape} does not match reference shape {t.shape}")
    if r.ndim == 2:
        r, t = r[None], t[None]
    if mask is None:
        m = np.ones(t.shape, dtype=bool)
    else:
        mk = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        mk = mk.astype(bool)
        try:
            m = np.broadcast_to(mk, t.shape)
        except ValueError:
            raise ValueError(f"mask shape {mk.shape} does not match image shape {t.shape}") from None
        if not m.any():
            raise ValueError("mask selects no pixel")
    if fit_scale:
        den = float(np.sum(r[m] ** 2))
        r = r * (float(np.sum(r[m] * t[m])) / den if den > 0 else 1.0)
    return r, t, m


def nrmse(recon: Array, reference: Array, *, mask: Array | None = None, fit_scale: bool = False) -> float:
    """Normalised RMSE ``||r - t|| / ||t||`` of the magnitudes (module docstring for conventions)."""
    r, t, m = _prepare(recon, reference, mask, fit_scale)
    den = float(np.linalg.norm(t[m]))
    if den == 0:
        raise ValueError("reference is zero: NRMSE undefined")
    return float(np.linalg.norm(r[m] - t[m])) / den


def psnr(recon: Array, reference: Array, *, mask: Array | None = None, fit_scale: bool = False) -> float:
    """PSNR in dB with data range ``max(reference)`` (module docstring for conventions)."""
    r, t, m = _prepare(recon, reference, mask, fit_scale)
    peak = float(t.max())
    if peak == 0:
        raise ValueError("reference is zero: PSNR undefined")
    mse = float(np.mean((r[m] - t[m]) ** 2))
    return math.inf if mse == 0 else 20.0 * math.log10(peak / math.sqrt(mse))


def _ssim_maps(r: np.ndarray, t: np.ndarray, data_range: float, win: int) -> np.ndarray:
    """SSIM maps ``(slices, rows, cols)`` per 2-D slice, scikit-image's formula (uniform window)."""
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    cov_norm = win * win / (win * win - 1.0)
    size = (1, win, win)  # never filter across slices
    ux = ndimage.uniform_filter(r, size=size)
    uy = ndimage.uniform_filter(t, size=size)
    uxx = ndimage.uniform_filter(r * r, size=size)
    uyy = ndimage.uniform_filter(t * t, size=size)
    uxy = ndimage.uniform_filter(r * t, size=size)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    num = (2 * ux * uy + c1) * (2 * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    return num / den


def ssim(
    recon: Array,
    reference: Array,
    *,
    mask: Array | None = None,
    fit_scale: bool = False,
    win_size: int = 7,
) -> float:
    """Mean SSIM of the magnitudes, scikit-image convention (module docstring)."""
    r, t, m = _prepare(recon, reference, mask, fit_scale)
    if win_size % 2 == 0 or win_size < 3:
        raise ValueError(f"win_size must be odd and >= 3, got {win_size}")
    if min(t.shape[-2:]) < win_size:
        raise ValueError(f"images {t.shape[-2:]} are smaller than the SSIM window {win_size}")
    peak = float(t.max())
    if peak == 0:
        raise ValueError("reference is zero: SSIM data range undefined")
    pad = (win_size - 1) // 2
    crop = (slice(None), slice(pad, t.shape[1] - pad), slice(pad, t.shape[2] - pad))
    smap = _ssim_maps(r, t, peak, win_size)[crop]
    keep = m[crop]
    if not keep.any():
        raise ValueError("mask selects no pixel inside the SSIM border crop")
    return float(smap[keep].mean())
