"""Unconditional samples from the prior (EDM deterministic sampler) and a PNG grid writer.

The sampler integrates the probability-flow ODE ``dx/ds = (x - D(x; s)) / s`` over the schedule
of :func:`recon_server.dpm.edm.edm_sigmas` (Karras et al. 2022, Algorithm 1):

    x_0 = s_0 n
    for i in 0 .. N-1:
        d   = (x_i - D(x_i; s_i)) / s_i                     # Euler slope
        x'  = x_i + (s_{i+1} - s_i) d
        if heun and s_{i+1} > 0:                            # 2nd-order correction
            d' = (x' - D(x'; s_{i+1})) / s_{i+1}
            x' = x_i + (s_{i+1} - s_i) (d + d') / 2
        x_{i+1} = x'

The schedule stays in float64; each step casts its sigma to the image dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from recon_server.dpm.edm import DEFAULT_RHO, DEFAULT_SIGMA_MAX, DEFAULT_SIGMA_MIN, edm_sigmas
from recon_server.dpm.unet import EDMDenoiser

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoise(x, sigma) -> x0_hat`` with the contrast already bound (``sigma`` a (B,) tensor)."""


@torch.no_grad()
def edm_sample(
    denoise: DenoiseFn,
    noise: torch.Tensor,
    *,
    sigmas: torch.Tensor,
    solver: str = "heun",
) -> torch.Tensor:
    """Integrate from ``x = sigmas[0] * noise`` down the schedule (ending with 0); returns ``x_N``."""
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    if sigmas.ndim != 1 or sigmas.numel() < 2 or float(sigmas[-1]) != 0.0:
        raise ValueError(
            "sigmas must be a 1-D decreasing schedule ending with 0 (edm_sigmas(append_zero=True))"
        )
    b = noise.shape[0]
    x = noise * float(sigmas[0])
    for i in range(sigmas.numel() - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - denoise(x, torch.full((b,), s, device=x.device))) / s
        x_next = x + (s_next - s) * d
        if solver == "heun" and s_next > 0:
            d2 = (x_next - denoise(x_next, torch.full((b,), s_next, device=x.device))) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d2)
        x = x_next
    return x


@torch.no_grad()
def sample_prior(
    model: EDMDenoiser,
    contrast: str,
    *,
    n: int,
    size: tuple[int, int],
    steps: int = 32,
    seed: int = 0,
    sigma_min: float = DEFAULT_SIGMA_MIN,
    sigma_max: float = DEFAULT_SIGMA_MAX,
    rho: float = DEFAULT_RHO,
    solver: str = "heun",
    batch: int = 8,
    amp: bool = True,
) -> torch.Tensor:
    """``n`` complex64 (n, H, W) samples of ``contrast`` from the prior, deterministic in ``seed``."""
    if n < 1 or size[0] < 2 or size[1] < 2:
        raise ValueError(f"need n >= 1 and a size of at least 2x2, got n={n}, size={size}")
    index = model.contrast_index(contrast)
    device = next(model.parameters()).device
    sigmas = edm_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    noise = torch.randn((n, 2, *size), generator=torch.Generator().manual_seed(seed))
    use_amp = amp and device.type == "cuda"
    out = []
    for start in range(0, n, batch):
        z = noise[start : start + batch].to(device)

        def denoise(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                return model(x, s, index).float()

        out.append(edm_sample(denoise, z, sigmas=sigmas, solver=solver).cpu())
    x = torch.cat(out)
    return torch.complex(x[:, 0], x[:, 1])
