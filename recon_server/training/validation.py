"""Validation during training: denoising quality of ``D`` on held-out slices at fixed noise.

The noise is a function of ``(seed, sigma index, slice)`` alone, so the numbers of two checkpoints
(or two runs) are directly comparable; :func:`validation_card` is the model-card section describing them.
"""

from __future__ import annotations

from typing import Any

import torch

from recon_server.dpm.edm import loss_weight
from recon_server.dpm.unet import EDMDenoiser
from recon_server.training.trainset import SliceSet, mix_seed

VAL_SIGMAS = (0.1, 0.5, 1.0)
VAL_SEED = 1234


@torch.no_grad()
def validate(
    model: EDMDenoiser,
    val_set: SliceSet,
    *,
    sigmas: tuple[float, ...] = VAL_SIGMAS,
    seed: int = VAL_SEED,
    batch: int = 8,
    max_slices: int = 64,
    amp: bool = True,
) -> dict[str, float]:
    """Denoising quality of ``D`` on held-out slices at fixed noise levels with fixed noise.

    For each ``sigma``: ``x_hat = D(x + sigma n, sigma, contrast)`` with ``n`` from a CPU generator
    seeded by ``(seed, slice)``; ``PSNR = 10 log10(max|x|^2 / mean|x_hat - x|^2)`` per slice (complex
    error, peak of the clean magnitude), averaged over slices; ``loss`` is the EDM-weighted error.
    At most ``max_slices`` slices, evenly spaced over the set.
    """
    device = next(model.parameters()).device
    n = len(val_set)
    if n == 0:
        raise ValueError("empty validation set")
    count = min(n, max_slices)
    picks = sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})
    sums: dict[str, float] = {}
    was_training = model.training
    model.eval()
    for start in range(0, len(picks), batch):
        chunk = picks[start : start + batch]
        items = [val_set[i] for i in chunk]
        x = torch.stack([it[0] for it in items]).to(device)
        labels = [it[1] for it in items]
        peak2 = torch.view_as_complex(x.permute(0, 2, 3, 1).contiguous()).abs().amax(dim=(1, 2)).square()
        for k, s in enumerate(sigmas):
            noise = torch.stack(
                [
                    torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(mix_seed(seed, k, i)))
                    for i in chunk
                ]
            ).to(device)
            sig = torch.full((x.shape[0],), s, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                d = model(x + s * noise, sig, labels).float()
            mse = (d - x).square().sum(dim=1).mean(dim=(1, 2))
            psnr = 10 * torch.log10(peak2 / mse.clamp_min(1e-20))
            loss = loss_weight(sig, model.config.sigma_data) * (d - x).square().mean(dim=(1, 2, 3))
            sums[f"psnr@{s:g}"] = sums.get(f"psnr@{s:g}", 0.0) + float(psnr.sum())
            sums[f"loss@{s:g}"] = sums.get(f"loss@{s:g}", 0.0) + float(loss.sum())
    model.train(was_training)
    out = {k: v / len(picks) for k, v in sums.items()}
    out["psnr_mean"] = sum(out[f"psnr@{s:g}"] for s in sigmas) / len(sigmas)
    out["slices"] = float(len(picks))
    return out


def validation_card(
    metrics: dict[str, Any] | None,
    best: dict[str, Any] | None,
    sigmas: tuple[float, ...],
    val_set: SliceSet | None,
) -> dict[str, Any]:
    """The model card's ``validation`` section (empty when the run has no held-out slices)."""
    if val_set is None:
        return {}
    return {
        "metric": f"denoising PSNR of the EMA denoiser on held-out slices, fixed noise (seed {VAL_SEED})",
        "sigmas": list(sigmas),
        "held_out_slices": len(val_set),
        "this_checkpoint": metrics,
        "best": best,
    }
