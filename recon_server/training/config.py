"""The settings of one training phase, and the step count that covers a number of epochs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from recon_server.training.schedule import LRSchedule
from recon_server.training.validation import VAL_SIGMAS


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training phase (keyword-only in spirit; stored in the state and the card)."""

    mode: str
    total_steps: int
    global_batch: int
    lr: LRSchedule
    ema_halflife_images: float = 500_000.0
    ema_rampup_ratio: float | None = 0.05
    seed: int = 0
    log_every: int = 50
    val_every: int = 500
    ckpt_every: int = 1000
    val_sigmas: tuple[float, ...] = VAL_SIGMAS
    val_max_slices: int = 64
    amp: bool = True
    grad_clip: float | None = None
    label_dropout: float = 0.0
    num_workers: int = 0
    progress: bool = True
    crop: int | None = None  # train on random crop x crop windows (same pixel size; see trainset)
    large_crop: int | None = None  # every large_every-th step uses this (larger) crop instead
    large_every: int = 0
    augment: bool = False  # head-biased patches + flips, gamma, gain, phase (recon_server.training.augment)
    cpu_precision: str = "fp32"  # on CPU: fp32, bf16, fp32-cl, bf16-cl (channels_last) or auto (probe)
    stop_at_step: int | None = None  # end this invocation early (checkpointed) for --resume later
    name: str = "recon-server-dpm"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr"] = self.lr.to_dict()
        d["val_sigmas"] = list(self.val_sigmas)
        del d["stop_at_step"]
        return d


def steps_for_epochs(epochs: float, *, n_slices: int, global_batch: int) -> int:
    """Optimizer steps covering ``epochs`` passes over ``n_slices`` (at least one)."""
    if epochs <= 0 or not math.isfinite(epochs):
        raise ValueError(f"epochs must be positive, got {epochs}")
    return max(1, math.ceil(epochs * n_slices / global_batch))
