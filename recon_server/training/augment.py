"""Patch sampling and augmentation for training the prior on CPUs (deterministic per step).

A patch prior learns local anatomy; on two cores every patch must count. Per optimizer step ``k``:

- :func:`head_patches`: each slice of the batch gives one ``crop x crop`` patch; of
  ``CANDIDATES`` corners drawn from a generator seeded by ``(seed, k, 3)``, the first whose patch
  holds enough signal (mean magnitude above ``min_signal``) is used, so few patches are empty
  background (which a denoiser learns in a few steps) and every rank / resumed run sees the same;
- :func:`augment`: random flips and transposes (orientation), a magnitude gamma (contrast),
  an intensity gain (the scale rule's spread between scans) and a smooth random phase (the coil
  combination's phase: ESPIRiT maps carry a smooth phase that the image then has), drawn from a
  generator seeded by ``(seed, k, 4)``.

Everything is a function of ``(seed, step)`` and the batch, so the trainer's exact-resume and
data-parallel guarantees (:mod:`recon_server.training.train`) hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recon_server.training.trainset import mix_seed

CANDIDATES = 4


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random changes (see the module docstring); ``enabled`` False: none."""

    enabled: bool = True
    gamma: tuple[float, float] = (0.8, 1.25)
    gain: tuple[float, float] = (0.75, 1.33)
    phase_ramp: float = math.pi  # peak linear phase across the patch (rad)
    phase_curve: float = 1.0  # peak quadratic phase (rad)


def _rows(b: int, rows: tuple[int, int] | None) -> tuple[slice, int]:
    """``rows = (first, global_batch)``: this rank's rows of the global batch; None: all of it."""
    first, total = rows or (0, b)
    if not 0 <= first <= total - b:
        raise ValueError(f"rows {first}..{first + b} are not inside a global batch of {total}")
    return slice(first, first + b), total


def head_patches(
    x: torch.Tensor,
    *,
    step: int,
    crop: int,
    seed: int,
    rows: tuple[int, int] | None = None,
    min_signal: float = 0.1,
) -> torch.Tensor:
    """``(B, 2, crop, crop)`` patches of ``x`` ``(B, 2, H, W)``, preferring ones inside the head.

    ``rows``: ``(first row, global batch)`` when ``x`` is one data-parallel rank's share.
    """
    b, _, h, w = x.shape
    if crop > min(h, w):
        raise ValueError(f"crop {crop} is larger than the {h}x{w} slices")
    mine, total = _rows(b, rows)
    gen = torch.Generator().manual_seed(mix_seed(seed, step, 3))
    tops = torch.randint(0, h - crop + 1, (total, CANDIDATES), generator=gen)[mine]
    lefts = torch.randint(0, w - crop + 1, (total, CANDIDATES), generator=gen)[mine]
    out = []
    for i in range(b):
        for j in range(CANDIDATES):
            t, left = int(tops[i, j]), int(lefts[i, j])
            patch = x[i, :, t : t + crop, left : left + crop]
            if j == CANDIDATES - 1 or float(patch.square().sum(0).sqrt().mean()) > min_signal:
                break
        out.append(patch)
    return torch.stack(out)


def augment(
    x: torch.Tensor, *, step: int, seed: int, settings: Augmentation, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """The batch ``x`` ``(B, 2, H, W)`` (real, imaginary) with per-sample random changes.

    ``rows`` as in :func:`head_patches`.
    """
    if not settings.enabled:
        return x
    b, _, h, w = x.shape
    mine, total = _rows(b, rows)
    gen = torch.Generator().manual_seed(mix_seed(seed, step, 4))
    flips = (torch.rand(total, 3, generator=gen) < 0.5)[mine]
    u = torch.rand(total, 7, generator=gen)[mine]
    out = []
    yy = torch.linspace(-1.0, 1.0, h)[:, None]
    xx = torch.linspace(-1.0, 1.0, w)[None, :]
    for i in range(b):
        z = torch.complex(x[i, 0], x[i, 1])
        if flips[i, 0]:
            z = z.flip(0)
        if flips[i, 1]:
            z = z.flip(1)
        if flips[i, 2] and h == w:
            z = z.transpose(0, 1)
        lo, hi = settings.gamma
        gamma = math.exp(math.log(lo) + float(u[i, 0]) * (math.log(hi) - math.log(lo)))
        lo, hi = settings.gain
        gain = math.exp(math.log(lo) + float(u[i, 1]) * (math.log(hi) - math.log(lo)))
        mag = z.abs()
        # |z|^gamma rescaled so the bright end (1 after normalisation) stays where it was.
        z = z * (mag.clamp_min(1e-12) ** (gamma - 1.0)) * gain
        ramp = settings.phase_ramp * (2 * u[i, 2:4] - 1)
        curve = settings.phase_curve * (2 * u[i, 4:6] - 1)
        phase = (
            2 * math.pi * float(u[i, 6]) + ramp[0] * yy + ramp[1] * xx + curve[0] * yy**2 + curve[1] * xx**2
        )
        z = z * torch.polar(torch.ones_like(phase), phase)
        out.append(torch.stack([z.real, z.imag]))
    return torch.stack(out).to(x.dtype)
