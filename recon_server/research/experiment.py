"""The paper's two experiments (arXiv 2603.13007) at a scale chosen on the command line.

Experiment 1 (training strategies, NRMSE at R = 4, 5, 6 on held-out FLAIR subjects):

- ``finetuned-N``: the pre-trained model (``--pretrained``, or pre-trained here on
  ``--pretrain-data``) fine-tuned on N FLAIR subjects (new slot, lr 1e-5, constant);
- ``scratch-N``: trained from scratch on the same N FLAIR subjects;
- ``many``: trained from scratch on every FLAIR training subject of ``--flair-data``;
- ``joint``: pre-training data and the N FLAIR subjects in one run (FLAIR slot from the start).

Experiment 2 (fine-tuning ablation): learning rates (``--lrs``, paper 5e-4, 1e-4, 5e-5, 1e-5) x
fine-tuning lengths (``--lengths``, epochs over the N subjects; paper 650 is ~2% of pre-training),
NRMSE at ``--ablation-accel``.

Every model is trained by :mod:`recon_server.training.runs` (held-out validation subjects of FLAIR by the
fixed split) and evaluated by :func:`recon_server.research.evaluate.run_evaluation` with ``--method``
(``dps-fast`` by default: the faithful ``dps`` costs ~15x more network evaluations). Outputs in
``--out``: ``runs/<model>/`` (checkpoints), ``eval/<model>/`` (evaluation files),
``experiment.json`` and ``experiment.md`` (tables with the command and the machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PAPER_LRS = "5e-4,1e-4,5e-5,1e-5"


def _options(
    args: argparse.Namespace,
    out: Path,
    *,
    lr: float,
    epochs: float,
    data: tuple[Path, ...],
    steps: int | None = None,
) -> Any:
    from recon_server.training.runs import RunOptions

    return RunOptions(
        data=data,
        out=out,
        lr=lr,
        batch=args.batch,
        epochs=None if steps else epochs,
        steps=steps,
        crop=args.crop,
        val_subjects=args.val_subjects,
        val_every=10**9,  # validate at the end only (short runs)
        ckpt_every=10**9,
        log_every=10**6,
        seed=args.seed,
        workers=0,
        device=args.train_device,
        progress=False,
        name=out.name,
    )


def _evaluate(
    args: argparse.Namespace,
    model_dir: Path | None,
    accels: list[int],
    name: str,
    methods: list[str] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """NRMSE ``[mean, sd]`` per method and acceleration (``{method: {"R": [m, sd]}}``)."""
    from recon_server.recon.methods import DiffusionSettings
    from recon_server.research.evaluate import run_evaluation

    diffusion = getattr(args, "diffusion", None) or DiffusionSettings()
    if model_dir is not None:
        diffusion = dataclasses.replace(diffusion, model_dir=model_dir)
    doc = run_evaluation(
        args.data,
        accelerations=accels,
        methods=methods or [args.method],
        out_dir=args.out / "eval" / name,
        subjects=args.subjects,
        slices=args.slices,
        device=args.device,
        diffusion=diffusion,
    )
    summary: list[dict[str, Any]] = doc["summary"]  # type: ignore[assignment]
    table: dict[str, dict[str, list[float]]] = {}
    for row in summary:
        table.setdefault(str(row["method"]), {})[str(row["acceleration"])] = list(row["nrmse"])
    return table


def _train_once(args: argparse.Namespace, run_dir: Path, train: Any) -> None:
    """``train()`` unless ``--reuse`` and ``run_dir`` already holds a finished run."""
    if args.reuse and (run_dir / "last" / "card.json").is_file():
        log.info("reusing %s (--reuse)", run_dir)
        return
    train()


def _pm(v: list[float] | None) -> str:
    return "-" if not v else f"{v[0]:.4f} ± {v[1]:.4f}"


def run_paper_experiments(args: argparse.Namespace) -> dict[str, Any]:
    """Train, evaluate and tabulate (module docstring); returns the JSON document with ``markdown``."""
    from recon_server.dpm.checkpoint import read_card
    from recon_server.machine import describe as describe_machine

    out: Path = args.out
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    contrasts = [c.strip() for c in args.contrasts.split(",") if c.strip()]
    t0 = time.perf_counter()
    pre_dir = _pretrained(args, runs, contrasts)
    pre_epochs = read_card(pre_dir).training.get("epochs") or args.pretrain_epochs
    ft_epochs = args.finetune_epochs or 0.02 * float(pre_epochs)
    doc: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": describe_machine(),
        "pretrained": str(pre_dir),
        "target_subjects": args.target_subjects,
        "method": args.method,
        "finetune_epochs": ft_epochs,
    }
    md = [f"command: `{doc['command']}`", f"machine: {doc['machine']}", ""]
    if args.only in (None, "1"):
        models = _train_strategies(args, runs, pre_dir, contrasts, ft_epochs)
        doc["experiment1"] = table = _compare_strategies(args, models)
        md += _strategies_markdown(args, table)
    if args.only in (None, "2"):
        lengths = args.lengths or [0.5 * ft_epochs, ft_epochs, 2 * ft_epochs]
        doc["experiment2"] = ablation = _finetuning_ablation(args, runs, pre_dir, lengths)
        md += _ablation_markdown(args, lengths, ablation)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    doc["markdown"] = "\n".join(md)
    (out / "experiment.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "experiment.md").write_text(doc["markdown"] + "\n")
    return doc


def _pretrained(args: argparse.Namespace, runs: Path, contrasts: list[str]) -> Path:
    """The checkpoint every fine-tuning starts from: ``--pretrained``, else pre-trained here."""
    from recon_server.dpm.checkpoint import resolve_checkpoint
    from recon_server.training.runs import pretrain

    if args.pretrained is not None:
        return resolve_checkpoint(args.pretrained)
    if not args.pretrain_data:
        raise ValueError("give --pretrained CKPT or --pretrain-data DIR")
    data = tuple(args.pretrain_data)
    opts = _options(args, runs / "pretrained", lr=args.pretrain_lr, epochs=args.pretrain_epochs, data=data)
    _train_once(args, opts.out, lambda: pretrain(opts, contrasts=contrasts, model_size=args.model_size))
    return resolve_checkpoint(runs / "pretrained")


def _train_strategies(
    args: argparse.Namespace, runs: Path, pre_dir: Path, contrasts: list[str], ft_epochs: float
) -> dict[str, Path]:
    """Experiment 1's models (module docstring), trained before any is evaluated; ``{name: run dir}``."""
    from recon_server.training.runs import finetune, pretrain

    n, flair = args.target_subjects, (args.flair_data,)
    scratch_epochs = args.scratch_epochs or args.pretrain_epochs
    models: dict[str, Path] = {}
    name = f"finetuned-{n}"
    opts = _options(args, runs / name, lr=args.finetune_lr, epochs=ft_epochs, data=flair)
    _train_once(
        args, opts.out, lambda: finetune(opts, from_ckpt=pre_dir, contrast="FLAIR", target_subjects=n)
    )
    models[name] = runs / name
    lr, steps = args.pretrain_lr, args.train_steps
    name = f"scratch-{n}"
    scratch = _options(args, runs / name, lr=lr, epochs=scratch_epochs, data=flair, steps=steps)
    scratch = dataclasses.replace(scratch, max_subjects=n)
    _train_once(args, scratch.out, lambda: pretrain(scratch, contrasts=["FLAIR"], model_size=args.model_size))
    models[name] = runs / name
    many = _options(args, runs / "many", lr=lr, epochs=scratch_epochs, data=flair, steps=steps)
    _train_once(args, many.out, lambda: pretrain(many, contrasts=["FLAIR"], model_size=args.model_size))
    models["many"] = runs / "many"
    if args.pretrain_data:
        joint_data = (*args.pretrain_data, args.flair_data)
        joint = _options(
            args, runs / "joint", lr=lr, epochs=args.pretrain_epochs, data=joint_data, steps=steps
        )
        _train_once(
            args,
            joint.out,
            functools.partial(
                pretrain,
                joint,
                contrasts=contrasts,
                model_size=args.model_size,
                joint="FLAIR",
                target_subjects=n,
            ),
        )
        models["joint"] = runs / "joint"
    return models


def _compare_strategies(
    args: argparse.Namespace, models: dict[str, Path]
) -> dict[str, dict[str, list[float]]]:
    """Experiment 1's table: NRMSE per model (and classical baseline) and acceleration."""
    accels = list(args.accel)
    table = {m: _evaluate(args, d, accels, m)[args.method] for m, d in models.items()}
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    if baselines:
        table.update(_evaluate(args, None, accels, "baselines", baselines))
    return table


def _strategies_markdown(args: argparse.Namespace, table: dict[str, dict[str, list[float]]]) -> list[str]:
    return [
        f"## Experiment 1: training strategies, NRMSE ({args.method}, mean ± sd over subjects)",
        "",
        "| model | " + " | ".join(f"R={r}" for r in args.accel) + " |",
        "|---|" + "---|" * len(args.accel),
        *(
            f"| {m} | " + " | ".join(_pm(row.get(str(r))) for r in args.accel) + " |"
            for m, row in table.items()
        ),
        "",
    ]


def _finetuning_ablation(
    args: argparse.Namespace, runs: Path, pre_dir: Path, lengths: list[float]
) -> dict[str, dict[str, list[float] | None]]:
    """Experiment 2: fine-tune at every lr x length and evaluate each at ``--ablation-accel``."""
    from recon_server.training.runs import finetune

    ablation: dict[str, dict[str, list[float] | None]] = {}
    for lr in args.lrs:
        ablation[f"{lr:g}"] = {}
        for length in lengths:
            name = f"ft-lr{lr:g}-ep{length:g}"
            ft = _options(args, runs / name, lr=lr, epochs=length, data=(args.flair_data,))
            _train_once(
                args,
                ft.out,
                functools.partial(
                    finetune, ft, from_ckpt=pre_dir, contrast="FLAIR", target_subjects=args.target_subjects
                ),
            )
            res = _evaluate(args, runs / name, [args.ablation_accel], name)[args.method]
            ablation[f"{lr:g}"][f"{length:g}"] = res.get(str(args.ablation_accel))
    return ablation


def _ablation_markdown(
    args: argparse.Namespace, lengths: list[float], ablation: dict[str, dict[str, list[float] | None]]
) -> list[str]:
    return [
        f"## Experiment 2: fine-tuning lr x length (epochs), NRMSE at R={args.ablation_accel}",
        "",
        "| lr | " + " | ".join(f"{ep:g} ep" for ep in lengths) + " |",
        "|---|" + "---|" * len(lengths),
        *(f"| {lr} | " + " | ".join(_pm(v) for v in row.values()) + " |" for lr, row in ablation.items()),
    ]
