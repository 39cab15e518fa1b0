"""Learning-rate schedules and the EMA of the weights, both driven by the run's own step counter.

The EDM trap (shared/reference/dpm-dps.md): EDM's loop ramps the learning rate up over 10 Mimg
counted from the start of *each* invocation, so a short fine-tune resumed from a pre-trained
snapshot at a nominal 1e-5 in effect runs at ~2e-7. Here the schedule is an explicit function of
the phase step (persisted in the training state, never reset by a resume), fine-tuning has no
warm-up by default, and the effective learning rate is logged at every log step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar, cast

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

SCHEDULE_KINDS = ("constant", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """``lr(step)`` for ``step = 0 .. total_steps - 1`` of one training phase.

    - ``constant``: ``base_lr``;
    - ``cosine``: ``min_lr + (base_lr - min_lr) (1 + cos(pi step / total_steps)) / 2``, starting at
      ``base_lr`` (no restart from zero);
    - optional linear warm-up over the first ``warmup_steps`` steps of the phase (multiplies the
      above by ``(step + 1) / warmup_steps``); default 0, and fine-tuning keeps it 0.
    """

    base_lr: float
    kind: str = "constant"
    total_steps: int = 1
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"lr schedule must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if not (self.base_lr > 0 and math.isfinite(self.base_lr)):
            raise ValueError(f"learning rate must be positive, got {self.base_lr}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError("total_steps must be >= 1 and warmup_steps >= 0")
        if not 0 <= self.min_lr <= self.base_lr:
            raise ValueError(f"min_lr must be in [0, base_lr], got {self.min_lr}")

    def lr_at(self, step: int) -> float:
        """Effective learning rate of the optimizer step with index ``step`` (0-based)."""
        if self.kind == "constant":
            lr = self.base_lr
        else:
            frac = min(max(step, 0), self.total_steps) / self.total_steps
            lr = self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * frac))
        if self.warmup_steps > 0 and step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EMA(Generic[M]):
    """Exponential moving average of the weights with a half-life measured in training images.

    After a step of ``batch`` images, ``ema <- beta ema + (1 - beta) w`` with
    ``beta = 0.5 ** (batch / h)``, ``h = min(halflife_images, rampup_ratio * images_seen)``
    (EDM's ramp-up: early on the average follows the weights instead of remembering the
    initialisation). ``images_seen`` counts the images of the current phase, so a fine-tune's EMA
    starts tracking the fine-tuned weights at once rather than staying near the pre-trained ones.
    Buffers are copied, not averaged.
    """

    def __init__(
        self, model: nn.Module, *, halflife_images: float, rampup_ratio: float | None = 0.05
    ) -> None:
        if halflife_images <= 0:
            raise ValueError(f"EMA half-life must be positive, got {halflife_images}")
        self.halflife_images = float(halflife_images)
        self.rampup_ratio = rampup_ratio
        self.model: M = cast(M, copy.deepcopy(model))
        self.model.eval().requires_grad_(False)

    def beta(self, *, images_seen: int, batch: int) -> float:
        h = self.halflife_images
        if self.rampup_ratio is not None:
            h = min(h, self.rampup_ratio * images_seen)
        return 0.5 ** (batch / max(h, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, *, images_seen: int, batch: int) -> float:
        """Fold the current weights in; returns the ``beta`` used."""
        beta = self.beta(images_seen=images_seen, batch=batch)
        for p_ema, p in zip(self.model.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - beta)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        return beta

    def to_dict(self) -> dict[str, Any]:
        return {"halflife_images": self.halflife_images, "rampup_ratio": self.rampup_ratio}
