"""Subcommands of the diffusion-prior area: ``train pretrain``, ``train finetune``, ``sample``.

Multi-GPU / multi-node: run the same command under torchrun, e.g.
``torchrun --nproc_per_node 8 -m recon_server.cli train pretrain ...``; ``--batch`` is the global
batch (split evenly over the processes).

torch is imported in the handlers: ``recon-server`` builds its parser without it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from recon_server.cli import options

log = logging.getLogger(__name__)

#: The names of ``recon_server.dpm.architecture.MODEL_SIZES`` (that module imports torch; a unit test
#: keeps the two equal).
MODEL_SIZE_NAMES = ("cpu", "cpu-res", "demo", "paper", "tiny", "tiny-res")


def _common(p: argparse.ArgumentParser, *, lr: float, batch: int) -> None:
    p.add_argument("--data", type=Path, nargs="+", required=True, help="prepared slice directories")
    p.add_argument(
        "--out", type=Path, required=True, help="run directory (train_state/, last/, best/, log.jsonl)"
    )
    p.add_argument("--lr", type=options.positive_float, default=lr, help="base learning rate")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--warmup-kimg", type=float, default=0.0, help="linear warm-up (thousands of images)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=options.positive_float, help="passes over the training slices")
    length.add_argument("--steps", type=options.positive_int, help="optimizer steps")
    p.add_argument("--batch", type=options.positive_int, default=batch, help="global batch (all processes)")
    p.add_argument("--ema-halflife-kimg", type=options.positive_float, default=500.0)
    p.add_argument("--ema-rampup", type=float, default=0.05, help="EMA ramp-up ratio (0 disables)")
    p.add_argument("--val-subjects", type=int, default=2, help="held-out subjects of the validation contrast")
    p.add_argument("--val-data", type=Path, help="separate held-out set instead of --val-subjects")
    p.add_argument("--val-every", type=int, default=500, help="steps between validations (0: never)")
    p.add_argument("--ckpt-every", type=options.positive_int, default=1000, help="steps between checkpoints")
    p.add_argument("--log-every", type=options.positive_int, default=50)
    p.add_argument("--max-subjects", type=options.positive_int, help="cap on training subjects per contrast")
    p.add_argument("--label-dropout", type=float, default=0.0, help="probability of dropping the contrast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA instead of bf16 autocast")
    p.add_argument("--workers", type=int, default=2, help="data-loader worker processes per rank")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--resume", action="store_true", help="continue RUN/train_state")
    p.add_argument("--name", default="", help="model name in the card")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--crop",
        type=options.positive_int,
        help="train on random N x N windows of the slices (same pixel size; the U-Net is convolutional)",
    )
    p.add_argument("--large-crop", type=options.positive_int, help="crop of every --large-every-th step")
    p.add_argument("--large-every", type=int, default=0, help="period of the --large-crop steps (0: never)")
    p.add_argument(
        "--augment",
        action="store_true",
        help="head-biased crops, flips, gamma, gain and smooth phase (recon_server.training.augment)",
    )
    p.add_argument("--grad-clip", type=options.positive_float, help="clip the gradient norm (default: none)")
    p.add_argument(
        "--val-sigmas",
        type=_floats,
        default=(0.1, 0.5, 1.0),
        help="noise levels of the validation PSNR (comma list); the best checkpoint maximises their mean",
    )
    p.add_argument(
        "--cpu-precision",
        choices=options.CPU_PRECISIONS,
        default="auto",
        help="CPU arithmetic (-cl: channels_last); auto times each on the machine and keeps the fastest",
    )
    p.add_argument(
        "--stop-at-step", type=options.positive_int, help="checkpoint and stop at this step (resume later)"
    )


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``recon-server`` parser."""
    fmt = options.HelpFormatter
    train = subparsers.add_parser("train", help="train the diffusion prior", formatter_class=fmt)
    phases = train.add_subparsers(dest="phase", required=True, metavar="PHASE")

    pre = phases.add_parser("pretrain", help="pre-train on several contrasts", formatter_class=fmt)
    _common(pre, lr=1e-4, batch=32)
    pre.add_argument("--contrasts", required=True, help="comma-separated, e.g. T1,T2,T1POST")
    pre.add_argument("--model-size", choices=MODEL_SIZE_NAMES, default="demo")
    pre.add_argument("--joint", metavar="CONTRAST", help="also train on this target contrast at once")
    pre.add_argument("--target-subjects", type=options.positive_int, help="cap on --joint training subjects")
    pre.set_defaults(func=_run_pretrain)

    fine = phases.add_parser("finetune", help="fine-tune on a new target contrast", formatter_class=fmt)
    _common(fine, lr=1e-5, batch=32)
    fine.add_argument(
        "--from", dest="from_ckpt", type=Path, required=True, help="pre-trained checkpoint or run"
    )
    fine.add_argument("--contrast", required=True, help="target contrast (gets a new slot)")
    fine.add_argument(
        "--epoch-fraction", type=options.positive_float, default=0.02, help="of the pre-training epochs"
    )
    fine.add_argument("--target-subjects", type=options.positive_int, help="cap on target training subjects")
    fine.add_argument("--slot-init", choices=["mean", "zeros"], default="mean")
    fine.set_defaults(func=_run_finetune)

    truth = phases.add_parser(
        "truth-set", help="noiseless training slices straight from the simulator", formatter_class=fmt
    )
    truth.add_argument("--out", type=Path, required=True, help="slice directory (slices.npy, index.json)")
    truth.add_argument("--contrast", required=True, help="T1, T2, T1POST or FLAIR")
    truth.add_argument("--subjects", type=options.positive_int, required=True)
    truth.add_argument("--first-subject", type=int, default=0)
    truth.add_argument(
        "--seed", type=int, required=True, help="simulator seed (keep it apart from test seeds)"
    )
    truth.add_argument(
        "--slices", type=options.positive_int, default=8, help="slices per subject (90 mm slab)"
    )
    truth.add_argument("--matrix", type=int, default=256)
    truth.add_argument("--lesions", action="store_true", help="add ischaemic stroke lesions")
    truth.set_defaults(func=_run_truth_set)

    smp = subparsers.add_parser("sample", help="draw images from the diffusion prior", formatter_class=fmt)
    smp.add_argument("--model", type=Path, required=True, help="checkpoint directory (or run directory)")
    smp.add_argument("--contrast", required=True)
    smp.add_argument("--n", type=options.positive_int, default=8)
    smp.add_argument("--out", type=Path, required=True, help="PNG grid of magnitudes")
    smp.add_argument("--steps", type=options.positive_int, default=32)
    smp.add_argument("--size", type=options.positive_int, default=256, help="square matrix size")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--solver", choices=["heun", "euler"], default="heun")
    smp.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    smp.add_argument("--save-npy", type=Path, help="also save the complex samples (n, H, W) as .npy")
    smp.set_defaults(func=_run_sample)


def _options(args: argparse.Namespace):  # noqa: ANN202 (RunOptions, imported lazily)
    from recon_server.training.runs import RunOptions  # noqa: PLC0415 (keep CLI start-up light)

    return RunOptions(
        data=tuple(args.data),
        out=args.out,
        lr=args.lr,
        batch=args.batch,
        epochs=args.epochs,
        steps=args.steps,
        lr_schedule=args.lr_schedule,
        warmup_kimg=args.warmup_kimg,
        ema_halflife_kimg=args.ema_halflife_kimg,
        ema_rampup_ratio=args.ema_rampup or None,
        val_subjects=args.val_subjects,
        val_data=args.val_data,
        val_every=args.val_every,
        ckpt_every=args.ckpt_every,
        log_every=args.log_every,
        seed=args.seed,
        amp=not args.no_amp,
        workers=args.workers,
        device=args.device,
        resume=args.resume,
        name=args.name,
        label_dropout=args.label_dropout,
        max_subjects=args.max_subjects,
        progress=not args.no_progress,
        stop_at_step=args.stop_at_step,
        crop=args.crop,
        large_crop=args.large_crop,
        large_every=args.large_every,
        augment=args.augment,
        cpu_precision=args.cpu_precision,
        grad_clip=args.grad_clip,
        val_sigmas=args.val_sigmas,
    )


def _finish(summary: dict) -> int:
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "best"} | {"best": summary.get("best")}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _run_pretrain(args: argparse.Namespace) -> int:
    from recon_server.training.runs import pretrain  # noqa: PLC0415

    summary = pretrain(
        _options(args),
        contrasts=[c for c in args.contrasts.split(",") if c.strip()],
        model_size=args.model_size,
        joint=args.joint,
        target_subjects=args.target_subjects,
    )
    return _finish(summary)


def _run_finetune(args: argparse.Namespace) -> int:
    from recon_server.training.runs import finetune  # noqa: PLC0415

    summary = finetune(
        _options(args),
        from_ckpt=args.from_ckpt,
        contrast=args.contrast,
        epoch_fraction=args.epoch_fraction,
        target_subjects=args.target_subjects,
        slot_init=args.slot_init,
    )
    return _finish(summary)


def _run_truth_set(args: argparse.Namespace) -> int:
    from recon_server.data.acquire import SimulationConfig  # noqa: PLC0415
    from recon_server.training.truthset import write_truth_set  # noqa: PLC0415

    if args.first_subject < 0:
        raise ValueError(f"--first-subject must be >= 0, got {args.first_subject}")
    config = SimulationConfig(
        contrast=args.contrast,
        matrix=args.matrix,
        slices=args.slices,
        coils=1,
        lesions=args.lesions,
        readout_oversampling=1,
    )
    path = write_truth_set(
        args.out, config, seed=args.seed, subjects=args.subjects, first_subject=args.first_subject
    )
    print(path)
    return 0


def _run_sample(args: argparse.Namespace) -> int:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from recon_server.dpm.checkpoint import load_checkpoint  # noqa: PLC0415
    from recon_server.dpm.sample import sample_prior  # noqa: PLC0415
    from recon_server.research.preview import magnitude_grid, write_png  # noqa: PLC0415

    device = (
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    model, card = load_checkpoint(args.model, device=device)
    model.contrast_index(args.contrast)  # clear error before any work
    images = sample_prior(
        model,
        args.contrast,
        n=args.n,
        size=(args.size, args.size),
        steps=args.steps,
        seed=args.seed,
        solver=args.solver,
    )
    write_png(args.out, magnitude_grid(images.numpy()))
    if args.save_npy:
        np.save(args.save_npy, images.numpy())
    log.info("wrote %d %s samples of %s to %s", args.n, args.contrast, card.name, args.out)
    return 0
