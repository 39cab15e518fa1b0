"""The training loop: EDM loss, Adam, explicit lr schedule, EMA, DDP, validation, checkpoints, resume.

One optimizer step ``k`` of a phase (pre-training or fine-tuning):

1. the global batch is ``global_batch_positions(k)`` (:mod:`recon_server.training.trainset`); rank ``r``
   of ``W`` loads its contiguous share of ``B / W`` slices;
2. the EDM draws (``ln sigma`` and the noise) for the *whole* global batch come from a generator
   seeded by ``(seed, k)``, and each rank uses its share, so ``W`` processes compute exactly the
   per-sample losses one process would; DDP averages the gradients of the per-rank mean losses,
   which equals the gradient of the global mean loss (equal shares);
3. dropout inside the network draws from the global RNG inside ``torch.random.fork_rng`` seeded by
   ``(seed, k, r)``, so nothing depends on history;
4. ``lr = schedule.lr_at(k)`` is set explicitly, Adam steps, the EMA folds in the new weights.

Everything is a function of the step, the weights and the optimizer state, so a resumed run
(which restores those three) continues bit-identically. bf16 autocast is used on CUDA only.
Rank 0 alone logs, validates, and writes ``RUN/train_state/`` (resume), ``RUN/last/`` and
``RUN/best/`` (served checkpoints holding the EMA weights) and ``RUN/log.jsonl``. The settings are a
:class:`~recon_server.training.config.TrainConfig`, the process's place in the job a
:class:`~recon_server.training.distributed.DistInfo`, the metric :mod:`recon_server.training.validation`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from recon_server.dpm.checkpoint import (
    load_training_state,
    read_training_meta,
    save_checkpoint,
    save_training_state,
)
from recon_server.dpm.edm import EDMLoss
from recon_server.dpm.precision import CpuPrecision, probe_cpu_precision, set_memory_format
from recon_server.dpm.unet import EDMDenoiser, count_parameters
from recon_server.training.augment import Augmentation, augment, head_patches
from recon_server.training.config import TrainConfig
from recon_server.training.distributed import DistInfo, hardware_description
from recon_server.training.schedule import EMA
from recon_server.training.trainset import SliceSet, StepBatchSampler, crop_batch, crop_offsets, mix_seed
from recon_server.training.validation import validate, validation_card

log = logging.getLogger(__name__)


def _collate(items: list[tuple[torch.Tensor, str, str]]) -> tuple[torch.Tensor, list[str], list[str]]:
    xs, contrasts, subjects = zip(*items, strict=True)
    return torch.stack(list(xs)), list(contrasts), list(subjects)


@dataclass
class _Phase:
    """What one invocation of a phase sets up before its first step, and the records it keeps."""

    model: EDMDenoiser
    ddp: torch.nn.Module  # the model itself when alone, else its DistributedDataParallel wrapper
    ema: EMA[EDMDenoiser]
    opt: torch.optim.Optimizer
    loader: DataLoader[Any]
    loss_fn: EDMLoss
    precision: CpuPrecision
    memory_format: torch.memory_format
    amp: bool
    card_info: dict[str, Any]
    out: Path
    state_dir: Path
    rows: slice  # this rank's share of the global batch
    start_step: int
    wall_before: float  # wall time of the invocations before a resume
    best: dict[str, Any] | None
    history: list[dict[str, Any]]
    t_start: float = field(default_factory=time.perf_counter)

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start


@dataclass
class _LossWindow:
    """Losses since the last log line, summed on the device so a step needs no host sync."""

    loss_sum: torch.Tensor
    count: int = 0
    images: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss.detach()
        self.count += 1
        self.images += images

    def restart(self, now: float) -> None:
        self.loss_sum.zero_()
        self.count, self.images, self.started = 0, 0, now


def train(
    model: EDMDenoiser,
    train_set: SliceSet,
    *,
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    val_set: SliceSet | None = None,
    card_info: dict[str, Any] | None = None,
    resume: bool = False,
    dist_info: DistInfo | None = None,
) -> dict[str, Any]:
    """Run (or resume) one training phase; returns a summary (final loss, steps, best validation)."""
    info = dist_info or DistInfo()
    phase = _set_up(model, train_set, config, Path(out_dir), resume=resume, info=info, card_info=card_info)
    bar = tqdm(
        total=config.total_steps,
        initial=phase.start_step,
        disable=not (config.progress and info.is_main),
        desc=config.mode,
        unit="step",
    )
    window = _LossWindow(torch.zeros((), device=info.device))
    last_loss, lr = float("nan"), config.lr.lr_at(phase.start_step)
    step = phase.start_step
    for step, (x_cpu, contrasts, _) in zip(
        range(phase.start_step, config.total_steps), phase.loader, strict=True
    ):
        loss = _forward_backward(phase, config, info, step, x_cpu, contrasts)
        lr = _optimizer_step(phase, config, step)
        window.add(loss, config.global_batch)
        stop = config.stop_at_step is not None and step + 1 >= config.stop_at_step
        done = step + 1 == config.total_steps or stop
        if (step + 1) % config.log_every == 0 or done:
            last_loss = _log_window(phase, window, config, info, len(train_set), step + 1, lr, bar)
        bar.update(1)
        val_now = (
            val_set is not None and config.val_every > 0 and ((step + 1) % config.val_every == 0 or done)
        )
        ckpt_now = (step + 1) % config.ckpt_every == 0 or done
        if info.is_main and (val_now or ckpt_now):
            _validate_and_save(
                phase, config, train_set, val_set, info, step + 1, lr, val_now=val_now, ckpt_now=ckpt_now
            )
        if info.world_size > 1 and (val_now or ckpt_now):
            dist.barrier()
        if stop:
            break
    bar.close()
    return {
        "steps": step + 1 if config.total_steps > phase.start_step else phase.start_step,
        "final_loss": last_loss,
        "final_lr": lr,
        "best": phase.best,
        "wall_time_s": phase.wall(),
        "num_parameters": count_parameters(model),
    }


def _set_up(
    model: EDMDenoiser,
    train_set: SliceSet,
    config: TrainConfig,
    out: Path,
    *,
    resume: bool,
    info: DistInfo,
    card_info: dict[str, Any] | None,
) -> _Phase:
    """Precision, EMA and Adam (restored on resume), the DDP wrapper and the step-ordered loader."""
    dev = info.device
    state_dir = out / "train_state"
    if config.global_batch % info.world_size:
        raise ValueError(
            f"--batch {config.global_batch} must be divisible by the {info.world_size} processes"
        )
    if not resume and state_dir.exists():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    model.to(dev).train()
    precision = _precision(config, model, state_dir if resume else None, info)
    set_memory_format(model, channels_last=precision.channels_last)
    ema: EMA[EDMDenoiser] = EMA(
        model, halflife_images=config.ema_halflife_images, rampup_ratio=config.ema_rampup_ratio
    )
    opt = torch.optim.Adam(model.parameters(), lr=config.lr.lr_at(0), betas=(0.9, 0.999), eps=1e-8)
    start_step, wall_before, best, history = 0, 0.0, None, []
    if resume:
        meta = load_training_state(state_dir, model=model, ema=ema.model, optimizer=opt)
        _check_resumable(meta["config"], config)
        start_step, wall_before = int(meta["step"]), float(meta["wall_time_s"])
        best, history = meta.get("best"), meta.get("history", [])
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    ddp: torch.nn.Module = model
    if info.world_size > 1:
        ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    local = config.global_batch // info.world_size
    return _Phase(
        model=model,
        ddp=ddp,
        ema=ema,
        opt=opt,
        loader=_loader(train_set, config, info, start_step),
        loss_fn=EDMLoss(sigma_data=model.config.sigma_data),
        precision=precision,
        memory_format=torch.channels_last if precision.channels_last else torch.contiguous_format,
        amp=(config.amp and dev.type == "cuda") or (dev.type == "cpu" and precision.bf16),
        card_info={**(card_info or {}), "cpu_precision": precision.to_dict()},
        out=out,
        state_dir=state_dir,
        rows=slice(info.rank * local, (info.rank + 1) * local),
        start_step=start_step,
        wall_before=wall_before,
        best=best,
        history=history,
    )


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    """A resumed run must draw the same batches, crops and schedule, or it would not continue exactly."""
    for key in ("global_batch", "seed", "lr", "total_steps"):
        if saved[key] != config.to_dict()[key]:
            raise ValueError(f"cannot resume: {key} was {saved[key]}, now {config.to_dict()[key]}")
    for key in ("crop", "large_crop", "large_every", "augment"):
        if saved.get(key, TrainConfig.__dataclass_fields__[key].default) != getattr(config, key):
            raise ValueError(f"cannot resume: {key} was {saved.get(key)}, now {getattr(config, key)}")


def _loader(train_set: SliceSet, config: TrainConfig, info: DistInfo, start_step: int) -> DataLoader[Any]:
    """This rank's share of each global batch, from ``start_step`` on."""
    sampler = StepBatchSampler(
        len(train_set),
        global_batch=config.global_batch,
        rank=info.rank,
        world_size=info.world_size,
        seed=config.seed,
        start_step=start_step,
        total_steps=config.total_steps,
    )
    return DataLoader(
        train_set,  # type: ignore[arg-type]
        batch_sampler=sampler,
        num_workers=config.num_workers,
        collate_fn=_collate,
        pin_memory=info.device.type == "cuda",
        persistent_workers=False,
    )


def _forward_backward(
    phase: _Phase, config: TrainConfig, info: DistInfo, step: int, x_cpu: torch.Tensor, contrasts: list[str]
) -> torch.Tensor:
    """This rank's mean EDM loss of ``step``, back-propagated; every draw depends on the step alone."""
    dev, gb, model, rows = info.device, config.global_batch, phase.model, phase.rows
    x_cpu = _patches(x_cpu, step, config, rows)
    x = x_cpu.to(dev, non_blocking=True).contiguous(memory_format=phase.memory_format)
    idx = torch.tensor([model.contrast_index(c) for c in contrasts], device=dev)
    onehot = F.one_hot(idx, model.config.num_slots).float()
    gen = torch.Generator(device=dev).manual_seed(mix_seed(config.seed, step, 1))
    z = torch.randn(gb, generator=gen, device=dev)
    noise = torch.randn((gb, *x.shape[1:]), generator=gen, device=dev).contiguous(
        memory_format=phase.memory_format
    )
    if config.label_dropout > 0:  # classifier-free guidance: some samples see no contrast
        keep = torch.rand(gb, generator=gen, device=dev) >= config.label_dropout
        onehot = onehot * keep[rows, None].float()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(mix_seed(config.seed, step, 2, info.rank))  # dropout masks, scoped
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=phase.amp):
            loss = phase.loss_fn(phase.ddp, x, onehot, ln_sigma_noise=z[rows], noise=noise[rows]).mean()
        loss.backward()
    return loss


def _optimizer_step(phase: _Phase, config: TrainConfig, step: int) -> float:
    """Adam at ``lr_at(step)`` on the sanitised (optionally clipped) gradients, then the EMA; returns lr."""
    lr = config.lr.lr_at(step)
    for group in phase.opt.param_groups:
        group["lr"] = lr
    for p in phase.model.parameters():  # a non-finite gradient would poison Adam's moments for good
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(phase.model.parameters(), config.grad_clip)
    phase.opt.step()
    phase.opt.zero_grad(set_to_none=True)
    phase.ema.update(phase.model, images_seen=(step + 1) * config.global_batch, batch=config.global_batch)
    return lr


def _log_window(
    phase: _Phase,
    window: _LossWindow,
    config: TrainConfig,
    info: DistInfo,
    train_slices: int,
    steps: int,
    lr: float,
    bar: tqdm[Any],
) -> float:
    """The window's mean loss over all ranks, logged by rank 0 with the throughput; starts a new window."""
    if info.world_size > 1:
        dist.all_reduce(window.loss_sum)
        window.loss_sum /= info.world_size
    loss = float(window.loss_sum) / window.count
    now = time.perf_counter()
    ips = window.images / max(now - window.started, 1e-9)
    images = steps * config.global_batch
    record = {
        "step": steps,
        "images": images,
        "epoch": images / train_slices,
        "loss": loss,
        "lr": lr,
        "img_per_s": ips,
        "wall_s": phase.wall_before + now - phase.t_start,
    }
    if info.is_main:
        _append_log(phase.out, record)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
        log.info("step %d loss %.4f lr %.3e %.1f img/s", steps, loss, lr, ips)
    window.restart(now)
    return loss


def _validate_and_save(
    phase: _Phase,
    config: TrainConfig,
    train_set: SliceSet,
    val_set: SliceSet | None,
    info: DistInfo,
    steps: int,
    lr: float,
    *,
    val_now: bool,
    ckpt_now: bool,
) -> None:
    """Rank 0 after ``steps``: validate the EMA (and keep it as ``best``), write ``last`` and the state."""
    wall = phase.wall()
    training = _card_training(phase.card_info, config, train_set, steps, lr, info, wall)
    metrics = None
    if val_now:
        assert val_set is not None
        metrics = _validate_ema(phase, config, val_set, steps, training)
    if ckpt_now:
        latest = metrics or (phase.history[-1] if phase.history else None)
        validation = validation_card(latest, phase.best, config.val_sigmas, val_set)
        save_checkpoint(
            phase.ema.model, phase.out / "last", name=config.name, training=training, validation=validation
        )
        _save_state(phase, config, steps, wall)


def _validate_ema(
    phase: _Phase, config: TrainConfig, val_set: SliceSet, steps: int, training: dict[str, Any]
) -> dict[str, Any]:
    """Validate the EMA weights, record the result, and save them as ``best`` when they beat it."""
    metrics: dict[str, Any] = validate(
        phase.ema.model, val_set, sigmas=config.val_sigmas, max_slices=config.val_max_slices, amp=config.amp
    )
    metrics["step"] = steps
    phase.history.append(metrics)
    _append_log(phase.out, {"validation": metrics})
    log.info("validation at step %d: %s", steps, metrics)
    if phase.best is None or metrics["psnr_mean"] > phase.best["psnr_mean"]:
        phase.best = metrics
        validation = validation_card(metrics, phase.best, config.val_sigmas, val_set)
        save_checkpoint(
            phase.ema.model, phase.out / "best", name=config.name, training=training, validation=validation
        )
    return metrics


def _save_state(phase: _Phase, config: TrainConfig, steps: int, wall: float) -> None:
    """Everything a resumed run needs to continue bit-identically after ``steps``."""
    model = phase.model
    save_training_state(
        phase.state_dir,
        model=model,
        ema=phase.ema.model,
        optimizer=phase.opt,
        meta={
            "step": steps,
            "wall_time_s": wall,
            "config": config.to_dict(),
            "architecture": model.config.to_dict(),
            "contrast_slots": list(model.contrast_slots),
            "card_info": phase.card_info,
            "best": phase.best,
            "history": phase.history,
            "cpu_precision": phase.precision.to_dict(),
            "rng": {"scheme": "mix_seed(seed, step, stream)", "seed": config.seed},
        },
    )


def _precision(
    config: TrainConfig, model: EDMDenoiser, state_dir: Path | None, info: DistInfo
) -> CpuPrecision:
    """bf16 / channels_last on CPU: as saved (resume), as configured, or measured (``auto``)."""
    if info.device.type != "cpu":
        return CpuPrecision()
    if state_dir is not None:
        saved = read_training_meta(state_dir).get("cpu_precision")
        if saved:  # a resumed run keeps its arithmetic, so it continues bit-identically
            return CpuPrecision(bool(saved["bf16"]), bool(saved["channels_last"]), saved.get("measured"))
    if config.cpu_precision != "auto":
        return CpuPrecision.named(config.cpu_precision)
    local = config.global_batch // info.world_size
    chosen = [probe_cpu_precision(model, batch=local, crop=config.crop or 64) if info.is_main else None]
    if info.world_size > 1:  # every rank must compute alike: rank 0's measurement decides
        dist.broadcast_object_list(chosen, src=0)
    assert chosen[0] is not None
    log.info("CPU precision probe (patches/s): %s -> %s", chosen[0].measured, chosen[0].name)
    return chosen[0]


def _patches(x: torch.Tensor, step: int, config: TrainConfig, rows: slice) -> torch.Tensor:
    """This rank's training inputs of ``step``: crops (random or head-biased) and augmentation."""
    crop = config.crop
    if crop is not None and config.large_crop and config.large_every and (step + 1) % config.large_every == 0:
        crop = min(config.large_crop, x.shape[2], x.shape[3])
    share = (rows.start, config.global_batch)
    if crop is not None and config.augment:
        x = head_patches(x, step=step, crop=crop, seed=config.seed, rows=share)
    elif crop is not None:  # offsets of the whole global batch; this rank takes its share
        hw = (x.shape[2], x.shape[3])
        corners = crop_offsets(step, global_batch=config.global_batch, size=hw, crop=crop, seed=config.seed)
        x = crop_batch(x, corners[rows], crop)
    if config.augment:
        x = augment(x, step=step, seed=config.seed, settings=Augmentation(), rows=share)
    return x


def _append_log(out: Path, record: dict[str, Any]) -> None:
    with (out / "log.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def _card_training(
    card_info: dict[str, Any],
    config: TrainConfig,
    train_set: SliceSet,
    steps: int,
    lr: float,
    info: DistInfo,
    wall: float,
) -> dict[str, Any]:
    images = steps * config.global_batch
    return {
        **card_info,
        "mode": config.mode,
        "steps": steps,
        "planned_steps": config.total_steps,
        "images": images,
        "train_slices": len(train_set),
        "epochs": images / len(train_set),
        "global_batch": config.global_batch,
        "crop": config.crop,
        "optimizer": {"name": "adam", "betas": [0.9, 0.999], "eps": 1e-8},
        "lr_schedule": config.lr.to_dict(),
        "effective_lr_last": lr,
        "ema": {"halflife_images": config.ema_halflife_images, "rampup_ratio": config.ema_rampup_ratio},
        "loss": {"name": "edm", "p_mean": -1.2, "p_std": 1.2, "sigma_data": 0.5},
        "label_dropout": config.label_dropout,
        "precision": _precision_label(config, info, card_info.get("cpu_precision")),
        "seed": config.seed,
        "hardware": hardware_description(info),
        "wall_time_s": round(wall, 1),
        "command": " ".join(sys.argv),
    }


def _precision_label(config: TrainConfig, info: DistInfo, cpu: dict[str, Any] | None) -> str:
    if info.device.type == "cuda":
        return "bf16 autocast" if config.amp else "fp32"
    if cpu and cpu.get("bf16"):
        return "bf16 autocast (CPU)" + (", channels_last" if cpu.get("channels_last") else "")
    return "fp32" + (", channels_last" if cpu and cpu.get("channels_last") else "")
