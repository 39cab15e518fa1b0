"""EDM formulation (Karras et al. 2022): preconditioning, training loss and noise-level schedule.

Everything here is pure math on tensors; the network lives in :mod:`recon_server.dpm.unet`.

Scale convention: training and inference images are complex slices divided by the 99th percentile
of their magnitude (docs/ARCHITECTURE.md), so pixel values are ``O(1)`` and the data standard
deviation is close to EDM's ``sigma_data = 0.5``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SIGMA_DATA = 0.5

# Sampler defaults for scale-normalised MRI (99th percentile -> 1): sigma_max 10 is 20 sigma_data,
# which buries every structure of an O(1) image (EDM's 80 is for [-1, 1] RGB with many more pixels
# and only costs extra steps here); sigma_min 0.004 is below the thermal noise left in a
# normalised fastMRI slice (~0.01-0.02). These are the values of the authors' group's MRI code.
DEFAULT_SIGMA_MIN = 0.004
DEFAULT_SIGMA_MAX = 10.0
DEFAULT_RHO = 7.0

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``D(x, sigma, onehot) -> x0_hat``: ``x`` (B, 2, H, W), ``sigma`` (B,), ``onehot`` (B, slots)."""


def precond_coefficients(
    sigma: torch.Tensor, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM preconditioning ``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma``.

    ``D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x; c_noise(s))`` with

    - ``c_skip = sd^2 / (s^2 + sd^2)``
    - ``c_out  = s sd / sqrt(s^2 + sd^2)``
    - ``c_in   = 1 / sqrt(s^2 + sd^2)``
    - ``c_noise = ln(s) / 4``

    (Karras et al. 2022, Table 1). Shapes follow ``sigma``.
    """
    if torch.any(sigma <= 0):
        raise ValueError("sigma must be positive for EDM preconditioning")
    sd2 = sigma_data**2
    s2 = sigma**2
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / (s2 + sd2).sqrt()
    c_in = 1.0 / (s2 + sd2).sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM loss weight ``lambda(s) = (s^2 + sd^2) / (s sd)^2`` (= ``1 / c_out^2``)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


@dataclass(frozen=True)
class EDMLoss:
    """EDM denoising score-matching loss.

    ``ln s ~ N(p_mean, p_std^2)``, ``n ~ N(0, s^2 I)``,
    ``L = lambda(s) * mean_pixels ||D(x + n; s, c) - x||^2`` per sample, with
    ``lambda(s) = (s^2 + sd^2) / (s sd)^2`` so that the effective target of the raw network ``F``
    has unit variance at every noise level.

    Call with explicit standard-normal draws (``ln_sigma_noise`` (B,), ``noise`` like ``x``) so the
    caller controls randomness (the training loop draws them from a per-step generator so that
    data-parallel and single-process runs see identical noise); :meth:`draw` makes them.
    """

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = SIGMA_DATA

    def draw(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Standard-normal draws ``(ln_sigma_noise (B,), noise like x)`` on ``x``'s device."""
        z = torch.randn(x.shape[0], generator=generator, device=x.device, dtype=torch.float32)
        n = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        return z, n

    def sigmas(self, ln_sigma_noise: torch.Tensor) -> torch.Tensor:
        """Map standard-normal draws to training noise levels ``exp(p_mean + p_std z)``."""
        return (self.p_mean + self.p_std * ln_sigma_noise).exp()

    def __call__(
        self,
        denoiser: Denoiser,
        x: torch.Tensor,
        labels: torch.Tensor,
        *,
        ln_sigma_noise: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample weighted loss (B,) for clean images ``x`` (B, 2, H, W) and labels (B, slots)."""
        sigma = self.sigmas(ln_sigma_noise).to(x.dtype)
        return self.at_sigma(denoiser, x, labels, sigma=sigma, noise=noise)

    def at_sigma(
        self,
        denoiser: Denoiser,
        x: torch.Tensor,
        labels: torch.Tensor,
        *,
        sigma: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted loss (B,) at given noise levels ``sigma`` (B,) (validation at fixed sigmas)."""
        s = sigma.reshape(-1, 1, 1, 1)
        denoised = denoiser(x + s * noise, sigma, labels).float()
        err = (denoised - x).square().mean(dim=(1, 2, 3))
        return loss_weight(sigma.float(), self.sigma_data) * err


def edm_sigmas(
    steps: int,
    *,
    sigma_min: float = DEFAULT_SIGMA_MIN,
    sigma_max: float = DEFAULT_SIGMA_MAX,
    rho: float = DEFAULT_RHO,
    append_zero: bool = True,
) -> torch.Tensor:
    """Karras noise levels, decreasing, as a float64 tensor.

    ``s_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho`` for ``i = 0..N-1``,
    followed by ``s_N = 0`` when ``append_zero`` (length ``N + 1``). Every sampler of the package
    (prior Heun sampler here, DPS and the fast posterior samplers) uses this schedule; keep it in
    float64 and cast per step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < sigma_min <= sigma_max or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    i = torch.arange(steps, dtype=torch.float64)
    frac = i / max(steps - 1, 1)
    s = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    s[0] = sigma_max  # exact endpoints (the power round trip is off by an ulp)
    if steps > 1:
        s[-1] = sigma_min
    if append_zero:
        s = torch.cat([s, torch.zeros(1, dtype=torch.float64)])
    return s
