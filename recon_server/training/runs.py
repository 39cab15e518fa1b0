"""Set up the three training phases of the paper from typed options: pretrain, finetune, joint.

- ``pretrain``: a fresh network with one slot per listed contrast, lr 1e-4. Validation on held-out
  subjects of every listed contrast (or of the ``joint`` target).
- ``joint`` (``pretrain`` with ``joint=FLAIR``): the same, plus the target contrast's training
  subjects in the same run, with their own slot from the start (the paper's weaker baseline).
- ``finetune``: load a pre-trained checkpoint, add a NEW slot for the target contrast, train the
  whole network (embedding net included) at lr 1e-5 with a constant schedule and no warm-up, for
  ``epoch_fraction`` (2%) of the epochs recorded in the pre-trained card, validating on held-out
  target subjects and keeping the best checkpoint.

Held-out subjects are picked by :func:`~recon_server.training.trainset.split_subjects` with a fixed
split seed, so every run on the same prepared data validates on the same subjects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recon_server.dpm.architecture import UNetConfig
from recon_server.dpm.checkpoint import CheckpointError, load_checkpoint, read_training_meta
from recon_server.dpm.unet import EDMDenoiser, build_denoiser, normalise_contrast
from recon_server.training.config import TrainConfig, steps_for_epochs
from recon_server.training.distributed import DistInfo, init_distributed
from recon_server.training.schedule import LRSchedule
from recon_server.training.train import train
from recon_server.training.trainset import (
    ConcatSlices,
    SliceSet,
    Subset,
    open_training_set,
    split_subjects,
    subjects_by_contrast,
)
from recon_server.training.validation import VAL_SIGMAS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """Options shared by ``train pretrain`` and ``train finetune`` (CLI flags of the same name)."""

    data: tuple[Path, ...]
    out: Path
    lr: float
    batch: int = 32
    epochs: float | None = None
    steps: int | None = None
    lr_schedule: str = "constant"
    warmup_kimg: float = 0.0
    ema_halflife_kimg: float = 500.0
    ema_rampup_ratio: float | None = 0.05
    val_subjects: int = 2
    val_data: Path | None = None
    val_every: int = 500
    ckpt_every: int = 1000
    log_every: int = 50
    seed: int = 0
    amp: bool = True
    workers: int = 2
    device: str = "auto"
    resume: bool = False
    name: str = ""
    label_dropout: float = 0.0
    max_subjects: int | None = None
    progress: bool = True
    stop_at_step: int | None = None
    crop: int | None = None
    large_crop: int | None = None
    large_every: int = 0
    augment: bool = False
    cpu_precision: str = "fp32"
    grad_clip: float | None = None
    val_sigmas: tuple[float, ...] = VAL_SIGMAS


def _val_split(
    opts: RunOptions, ds: SliceSet, contrast: str, max_train: int | None, *, hold_out: bool = True
) -> tuple[list[int], list[int], dict]:
    """Training indices, validation indices (into ``ds``) and a description for the card."""
    n_val = opts.val_subjects if (hold_out and opts.val_data is None) else 0
    split = split_subjects(ds, contrast, n_val=n_val, max_train=max_train)
    desc = {"train_subjects": len(split.train_subjects), "val_subjects": split.val_subjects}
    return split.train_indices, split.val_indices, desc


def _external_val(opts: RunOptions, contrasts: list[str]) -> SliceSet | None:
    if opts.val_data is None:
        return None
    vds = open_training_set(opts.val_data)
    keep = [i for i in range(len(vds)) if vds.info(i).contrast in contrasts]
    if not keep:
        raise ValueError(f"--val-data {opts.val_data} has no slices of {contrasts}")
    return Subset(vds, keep)


def _train_config(opts: RunOptions, *, mode: str, n_train: int, default_epochs: float | None) -> TrainConfig:
    if opts.steps is not None:
        total = opts.steps
    else:
        epochs = opts.epochs if opts.epochs is not None else default_epochs
        if epochs is None:
            raise ValueError("give --epochs or --steps")
        total = steps_for_epochs(epochs, n_slices=n_train, global_batch=opts.batch)
    if total < 1 or opts.batch < 1:
        raise ValueError("steps and batch must be positive")
    schedule = LRSchedule(
        base_lr=opts.lr,
        kind=opts.lr_schedule,
        total_steps=total,
        warmup_steps=round(opts.warmup_kimg * 1000 / opts.batch),
    )
    return TrainConfig(
        mode=mode,
        total_steps=total,
        global_batch=opts.batch,
        lr=schedule,
        ema_halflife_images=opts.ema_halflife_kimg * 1000,
        ema_rampup_ratio=opts.ema_rampup_ratio,
        seed=opts.seed,
        log_every=opts.log_every,
        val_every=opts.val_every,
        ckpt_every=opts.ckpt_every,
        amp=opts.amp,
        label_dropout=opts.label_dropout,
        num_workers=opts.workers,
        progress=opts.progress,
        stop_at_step=opts.stop_at_step,
        crop=opts.crop,
        large_crop=opts.large_crop,
        large_every=opts.large_every,
        augment=opts.augment,
        cpu_precision=opts.cpu_precision,
        grad_clip=opts.grad_clip,
        val_sigmas=opts.val_sigmas,
        name=opts.name or f"{mode}-{opts.out.name}",
    )


def _resumed_model(opts: RunOptions) -> EDMDenoiser:
    meta = read_training_meta(opts.out / "train_state")
    return EDMDenoiser(UNetConfig.from_dict(meta["architecture"]), meta["contrast_slots"])


def _data_card(ds: SliceSet, train_idx: list[int], val: SliceSet | None) -> dict[str, Any]:
    table = subjects_by_contrast(Subset(ds, train_idx))
    return {
        "description": str(getattr(ds, "description", "")),
        "train_slices": len(train_idx),
        "train_subjects_per_contrast": {c: len(s) for c, s in sorted(table.items())},
        "val_slices": 0 if val is None else len(val),
    }


def pretrain(
    opts: RunOptions,
    *,
    contrasts: list[str],
    model_size: str = "demo",
    joint: str | None = None,
    target_subjects: int | None = None,
    dist_info: DistInfo | None = None,
) -> dict[str, Any]:
    """Pre-train (or, with ``joint``, train jointly with the target contrast) from scratch."""
    info = dist_info or init_distributed(opts.device)
    names = [normalise_contrast(c) for c in contrasts]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--contrasts needs distinct names, got {contrasts}")
    target = normalise_contrast(joint) if joint else None
    if target in names:
        raise ValueError(f"--joint {target} is already one of --contrasts")
    ds = open_data(opts.data)
    train_idx: list[int] = []
    val_idx: list[int] = []
    splits: dict[str, Any] = {}
    val_contrasts = [target] if target else names
    for c in names:
        tr, va, desc = _val_split(opts, ds, c, opts.max_subjects, hold_out=c in val_contrasts)
        train_idx += tr
        val_idx += va
        splits[c] = desc
    if target:
        tr, va, desc = _val_split(opts, ds, target, target_subjects)
        train_idx += tr
        val_idx += va
        splits[target] = desc
    slots = names + ([target] if target else [])
    val_set = _external_val(opts, val_contrasts) or (Subset(ds, val_idx) if val_idx else None)
    mode = "joint" if target else "pretrain"
    config = _train_config(opts, mode=mode, n_train=len(train_idx), default_epochs=None)
    model = _resumed_model(opts) if opts.resume else build_denoiser(model_size, slots, seed=opts.seed)
    card_info = {
        "model_size": model_size,
        "data": {
            **_data_card(ds, train_idx, val_set),
            "paths": [str(p) for p in opts.data],
            "splits": splits,
        },
        "validation_contrasts": val_contrasts,
    }
    return train(
        model,
        Subset(ds, train_idx),
        config=config,
        out_dir=opts.out,
        val_set=val_set,
        card_info=card_info,
        resume=opts.resume,
        dist_info=info,
    )


def finetune(
    opts: RunOptions,
    *,
    from_ckpt: Path,
    contrast: str,
    epoch_fraction: float = 0.02,
    target_subjects: int | None = None,
    slot_init: str = "mean",
    dist_info: DistInfo | None = None,
) -> dict[str, Any]:
    """Fine-tune a pre-trained checkpoint on a new target contrast (adds its one-hot slot)."""
    info = dist_info or init_distributed(opts.device)
    target = normalise_contrast(contrast)
    if not 0 < epoch_fraction <= 10:
        raise ValueError(f"--epoch-fraction must be in (0, 10], got {epoch_fraction}")
    parent, parent_card = load_checkpoint(from_ckpt)
    if target in parent.contrast_slots:
        raise ValueError(
            f"{from_ckpt} already has a {target} slot ({list(parent.contrast_slots)}); "
            "fine-tuning adds a new one"
        )
    parent_epochs = parent_card.training.get("epochs")
    default_epochs = None
    if opts.epochs is None and opts.steps is None:
        if not isinstance(parent_epochs, int | float) or parent_epochs <= 0:
            raise CheckpointError(
                f"{from_ckpt}: its card records no pre-training epochs; give --epochs or --steps"
            )
        default_epochs = epoch_fraction * float(parent_epochs)
    ds = open_data(opts.data)
    train_idx, val_idx, desc = _val_split(opts, ds, target, target_subjects)
    val_set = _external_val(opts, [target]) or (Subset(ds, val_idx) if val_idx else None)
    config = _train_config(opts, mode="finetune", n_train=len(train_idx), default_epochs=default_epochs)
    if opts.resume:
        model = _resumed_model(opts)
    else:
        model = parent
        slot = model.add_contrast_slot(target, init=slot_init)
        log.info(
            "added contrast slot %d (%s), init %s; slots %s", slot, target, slot_init, model.contrast_slots
        )
    card_info = {
        "data": {
            **_data_card(ds, train_idx, val_set),
            "paths": [str(p) for p in opts.data],
            "splits": {target: desc},
        },
        "validation_contrasts": [target],
        "parent": {
            "name": parent_card.name,
            "path": str(from_ckpt),
            "contrast_slots": parent_card.contrast_slots,
            "epochs": parent_epochs,
            "training": {
                k: parent_card.training.get(k) for k in ("mode", "steps", "images", "data", "lr_schedule")
            },
        },
        "new_slot": {"contrast": target, "index": len(parent_card.contrast_slots), "init": slot_init},
        "epoch_fraction": epoch_fraction if default_epochs is not None else None,
    }
    return train(
        model,
        Subset(ds, train_idx),
        config=config,
        out_dir=opts.out,
        val_set=val_set,
        card_info=card_info,
        resume=opts.resume,
        dist_info=info,
    )


def open_data(paths: tuple[Path, ...]) -> SliceSet:
    """One prepared directory, or several concatenated (e.g. pre-training set + target set)."""
    if not paths:
        raise ValueError("give at least one --data directory")
    sets = [open_training_set(p) for p in paths]
    return sets[0] if len(sets) == 1 else ConcatSlices(sets)
