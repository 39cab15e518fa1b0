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
``RUN/best/`` (served checkpoints holding the EMA weights) and ``RUN/log.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
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
from recon_server.dpm.edm import EDMLoss, loss_weight
from recon_server.dpm.precision import CpuPrecision, probe_cpu_precision, set_memory_format
from recon_server.dpm.unet import EDMDenoiser, count_parameters
from recon_server.machine import cpu_model
from recon_server.training.augment import Augmentation, augment, head_patches
from recon_server.training.schedule import EMA, LRSchedule
from recon_server.training.trainset import SliceSet, StepBatchSampler, crop_batch, crop_offsets, mix_seed

log = logging.getLogger(__name__)

VAL_SIGMAS = (0.1, 0.5, 1.0)
VAL_SEED = 1234


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) data-parallel job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun job described by the environment (``env://``), or run alone.

    ``nccl`` when on CUDA, ``gloo`` on CPU. ``device``: ``auto`` (``cuda:LOCAL_RANK`` when CUDA is
    available, else CPU), ``cpu`` or ``cuda``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def hardware_description(info: DistInfo) -> dict[str, Any]:
    if info.device.type == "cuda":
        name = torch.cuda.get_device_name(info.device)
    else:
        name = f"{cpu_model()} ({os.cpu_count()} cores)"
    return {
        "device": name,
        "device_type": info.device.type,
        "world_size": info.world_size,
        "torch": torch.__version__,
    }


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


def _collate(items: list[tuple[torch.Tensor, str, str]]) -> tuple[torch.Tensor, list[str], list[str]]:
    xs, contrasts, subjects = zip(*items, strict=True)
    return torch.stack(list(xs)), list(contrasts), list(subjects)


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
    dev = info.device
    out = Path(out_dir)
    state_dir = out / "train_state"
    if config.global_batch % info.world_size:
        raise ValueError(
            f"--batch {config.global_batch} must be divisible by the {info.world_size} processes"
        )
    if not resume and state_dir.exists():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    model.to(dev).train()
    precision = _precision(config, model, state_dir if resume else None, info)
    memory_format = torch.channels_last if precision.channels_last else torch.contiguous_format
    set_memory_format(model, channels_last=precision.channels_last)
    ema: EMA[EDMDenoiser] = EMA(
        model, halflife_images=config.ema_halflife_images, rampup_ratio=config.ema_rampup_ratio
    )
    opt = torch.optim.Adam(model.parameters(), lr=config.lr.lr_at(0), betas=(0.9, 0.999), eps=1e-8)
    start_step, wall_before, best, history = 0, 0.0, None, []
    if resume:
        meta = load_training_state(state_dir, model=model, ema=ema.model, optimizer=opt)
        saved = meta["config"]
        for key in ("global_batch", "seed", "lr", "total_steps"):
            if saved[key] != config.to_dict()[key]:
                raise ValueError(f"cannot resume: {key} was {saved[key]}, now {config.to_dict()[key]}")
        for key in ("crop", "large_crop", "large_every", "augment"):
            if saved.get(key, TrainConfig.__dataclass_fields__[key].default) != getattr(config, key):
                raise ValueError(f"cannot resume: {key} was {saved.get(key)}, now {getattr(config, key)}")
        start_step, wall_before = int(meta["step"]), float(meta["wall_time_s"])
        best, history = meta.get("best"), meta.get("history", [])
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    ddp: torch.nn.Module = model
    if info.world_size > 1:
        ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    gb, local = config.global_batch, config.global_batch // info.world_size
    sampler = StepBatchSampler(
        len(train_set),
        global_batch=gb,
        rank=info.rank,
        world_size=info.world_size,
        seed=config.seed,
        start_step=start_step,
        total_steps=config.total_steps,
    )
    loader: DataLoader[Any] = DataLoader(
        train_set,  # type: ignore[arg-type]
        batch_sampler=sampler,
        num_workers=config.num_workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    loss_fn = EDMLoss(sigma_data=model.config.sigma_data)
    amp = (config.amp and dev.type == "cuda") or (dev.type == "cpu" and precision.bf16)
    card_info = {**(card_info or {}), "cpu_precision": precision.to_dict()}
    bar = tqdm(
        total=config.total_steps,
        initial=start_step,
        disable=not (config.progress and info.is_main),
        desc=config.mode,
        unit="step",
    )
    t_start, t_window, n_window = time.perf_counter(), time.perf_counter(), 0
    loss_sum, loss_count, last_loss, lr = (
        torch.zeros((), device=dev),
        0,
        float("nan"),
        config.lr.lr_at(start_step),
    )
    step = start_step
    sl = slice(info.rank * local, (info.rank + 1) * local)
    for step, (x_cpu, contrasts, _) in zip(range(start_step, config.total_steps), loader, strict=True):
        x_cpu = _patches(x_cpu, step, config, sl)
        x = x_cpu.to(dev, non_blocking=True).contiguous(memory_format=memory_format)
        idx = torch.tensor([model.contrast_index(c) for c in contrasts], device=dev)
        onehot = F.one_hot(idx, model.config.num_slots).float()
        gen = torch.Generator(device=dev).manual_seed(mix_seed(config.seed, step, 1))
        z = torch.randn(gb, generator=gen, device=dev)
        noise = torch.randn((gb, *x.shape[1:]), generator=gen, device=dev).contiguous(
            memory_format=memory_format
        )
        if config.label_dropout > 0:  # classifier-free guidance: some samples see no contrast
            keep = torch.rand(gb, generator=gen, device=dev) >= config.label_dropout
            onehot = onehot * keep[sl, None].float()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(mix_seed(config.seed, step, 2, info.rank))  # dropout masks, scoped
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(ddp, x, onehot, ln_sigma_noise=z[sl], noise=noise[sl]).mean()
            loss.backward()
        lr = config.lr.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        for p in model.parameters():  # a non-finite gradient would poison Adam's moments for good
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        images = (step + 1) * gb
        ema.update(model, images_seen=images, batch=gb)
        loss_sum += loss.detach()
        loss_count += 1
        n_window += gb
        stop = config.stop_at_step is not None and step + 1 >= config.stop_at_step
        done = step + 1 == config.total_steps or stop
        if (step + 1) % config.log_every == 0 or done:
            if info.world_size > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= info.world_size
            last_loss = float(loss_sum) / loss_count
            now = time.perf_counter()
            ips = n_window / max(now - t_window, 1e-9)
            record = {
                "step": step + 1,
                "images": images,
                "epoch": images / len(train_set),
                "loss": last_loss,
                "lr": lr,
                "img_per_s": ips,
                "wall_s": wall_before + now - t_start,
            }
            if info.is_main:
                _append_log(out, record)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
                log.info("step %d loss %.4f lr %.3e %.1f img/s", step + 1, last_loss, lr, ips)
            loss_sum.zero_()
            loss_count, t_window, n_window = 0, now, 0
        bar.update(1)
        val_now = (
            val_set is not None and config.val_every > 0 and ((step + 1) % config.val_every == 0 or done)
        )
        ckpt_now = (step + 1) % config.ckpt_every == 0 or done
        if info.is_main and (val_now or ckpt_now):
            wall = wall_before + time.perf_counter() - t_start
            training = _card_training(card_info, config, train_set, step + 1, lr, info, wall)
            metrics = None
            if val_now:
                assert val_set is not None
                metrics = validate(
                    ema.model,
                    val_set,
                    sigmas=config.val_sigmas,
                    max_slices=config.val_max_slices,
                    amp=config.amp,
                )
                metrics["step"] = step + 1
                history.append(metrics)
                _append_log(out, {"validation": metrics})
                log.info("validation at step %d: %s", step + 1, metrics)
                if best is None or metrics["psnr_mean"] > best["psnr_mean"]:
                    best = metrics
                    validation = _card_validation(metrics, best, config, val_set)
                    save_checkpoint(
                        ema.model, out / "best", name=config.name, training=training, validation=validation
                    )
            if ckpt_now:
                latest = metrics or (history[-1] if history else None)
                validation = _card_validation(latest, best, config, val_set)
                save_checkpoint(
                    ema.model, out / "last", name=config.name, training=training, validation=validation
                )
                save_training_state(
                    state_dir,
                    model=model,
                    ema=ema.model,
                    optimizer=opt,
                    meta={
                        "step": step + 1,
                        "wall_time_s": wall,
                        "config": config.to_dict(),
                        "architecture": model.config.to_dict(),
                        "contrast_slots": list(model.contrast_slots),
                        "card_info": card_info,
                        "best": best,
                        "history": history,
                        "cpu_precision": precision.to_dict(),
                        "rng": {"scheme": "mix_seed(seed, step, stream)", "seed": config.seed},
                    },
                )
        if info.world_size > 1 and (val_now or ckpt_now):
            dist.barrier()
        if stop:
            break
    bar.close()
    return {
        "steps": step + 1 if config.total_steps > start_step else start_step,
        "final_loss": last_loss,
        "final_lr": lr,
        "best": best,
        "wall_time_s": wall_before + time.perf_counter() - t_start,
        "num_parameters": count_parameters(model),
    }


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


def _card_validation(
    metrics: dict[str, Any] | None, best: dict[str, Any] | None, config: TrainConfig, val_set: SliceSet | None
) -> dict[str, Any]:
    if val_set is None:
        return {}
    return {
        "metric": f"denoising PSNR of the EMA denoiser on held-out slices, fixed noise (seed {VAL_SEED})",
        "sigmas": list(config.val_sigmas),
        "held_out_slices": len(val_set),
        "this_checkpoint": metrics,
        "best": best,
    }


def steps_for_epochs(epochs: float, *, n_slices: int, global_batch: int) -> int:
    """Optimizer steps covering ``epochs`` passes over ``n_slices`` (at least one)."""
    if epochs <= 0 or not math.isfinite(epochs):
        raise ValueError(f"epochs must be positive, got {epochs}")
    return max(1, math.ceil(epochs * n_slices / global_batch))
