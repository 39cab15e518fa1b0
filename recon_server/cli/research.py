"""Subcommands of this area: ``evaluate``, ``tune-zeta``, ``experiment paper`` (docs/dps.md).

- ``evaluate``: methods x accelerations on held-out simulated subjects
  (:mod:`recon_server.research.evaluate`).
- ``tune-zeta``: sweep the data-consistency weight per acceleration on validation subjects (zeta
  for ``dps``, the CG weight gamma for ``dps-fast`` / ``dps-warm``), write the best into the card.
- ``experiment paper``: the paper's two experiments at a small scale (:mod:`.experiment`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from recon_server.cli import options
from recon_server.research.experiment import PAPER_LRS

if TYPE_CHECKING:
    from recon_server.recon.methods import DiffusionSettings

log = logging.getLogger(__name__)


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="checkpoint directory for the dps methods (default: shipped)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (falls back to the CPU)")
    options.add_sampler_overrides(p)
    p.add_argument("--seed", type=int, default=0, help="sampler seed")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``recon-server`` parser."""
    fmt = options.HelpFormatter
    ev = subparsers.add_parser(
        "evaluate", help="compare methods on held-out simulated subjects", formatter_class=fmt
    )
    ev.add_argument("--data", type=Path, required=True, help="directory of sub-XXX/ (recon-server simulate)")
    ev.add_argument(
        "--accel", type=options.int_list, default=[2, 4, 5, 6], help="accelerations, e.g. 2,4,5,6"
    )
    ev.add_argument(
        "--methods",
        type=options.str_list,
        default=["zero-filled", "cg-sense", "l1-wavelet", "dps", "dps-fast"],
        help=f"comma list of methods to compare, from {options.METHOD_LIST}",
    )
    ev.add_argument("--bart", action="store_true", help="add BART pics as an outside reference")
    ev.add_argument(
        "--subjects", type=options.positive_int, help="at most this many subjects (sorted; default: all)"
    )
    ev.add_argument(
        "--slices", type=options.positive_int, help="only this many central slices per subject (default: all)"
    )
    ev.add_argument("--out", type=Path, default=Path("eval-out"), help="results.json/.md and montages")
    add_model_options(ev)
    ev.set_defaults(func=run_evaluate)

    tz = subparsers.add_parser(
        "tune-zeta",
        help="sweep the data-consistency weight per R, write the best into the card",
        formatter_class=fmt,
    )
    tz.add_argument("--model", type=Path, required=True, help="checkpoint directory (its card is updated)")
    tz.add_argument("--data", type=Path, required=True, help="validation subjects (sub-XXX/)")
    tz.add_argument("--accel", type=options.int_list, default=[2, 4, 5, 6], help="accelerations")
    tz.add_argument("--zetas", type=options.float_list, required=True, help="weights to try, e.g. 0.3,1,3")
    tz.add_argument(
        "--method", choices=["dps", "dps-fast", "dps-warm"], default="dps", help="diffusion method to tune"
    )
    tz.add_argument("--subjects", type=options.positive_int, default=2, help="validation subjects used")
    tz.add_argument("--slices", type=options.positive_int, default=4, help="central slices per subject")
    tz.add_argument("--dry-run", action="store_true", help="print the sweep, leave the card alone")
    tz.add_argument("--device", default="cpu", help="torch device")
    options.add_sampler_overrides(tz)
    tz.add_argument("--seed", type=int, default=0, help="sampler seed")
    tz.set_defaults(func=run_tune_zeta)

    exp = subparsers.add_parser(
        "experiment", help="the paper's experiments at a small scale", formatter_class=fmt
    )
    kinds = exp.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")

    paper = kinds.add_parser(
        "paper", help="fine-tuned vs scratch vs many vs joint; lr x length", formatter_class=fmt
    )
    add_experiment_arguments(paper)
    paper.set_defaults(func=run_experiment)


def diffusion_settings(args: argparse.Namespace) -> DiffusionSettings:
    """The diffusion methods' settings from ``--model``, ``--set`` and ``--seed``."""
    from recon_server.recon.methods import DiffusionSettings

    return DiffusionSettings(
        model_dir=getattr(args, "model", None),
        overrides=options.method_overrides(getattr(args, "overrides", None)),
        seed=args.seed,
    )


def run_evaluate(args: argparse.Namespace) -> int:
    """``recon-server evaluate``: prints the summary table, writes results into ``--out``."""
    from recon_server.research.evaluate import markdown_table, run_evaluation

    doc = run_evaluation(
        args.data,
        accelerations=args.accel,
        methods=args.methods,
        out_dir=args.out,
        subjects=args.subjects,
        slices=args.slices,
        bart=args.bart,
        device=args.device,
        diffusion=diffusion_settings(args),
        progress=_print_case,
    )
    print(markdown_table(doc["summary"]))  # type: ignore[arg-type]
    print(f"\nwritten: {args.out}/results.json, results.md, montage_R*.png")
    return 0


def _print_case(done: int, total: int, text: str) -> None:
    print(f"recon-server evaluate: case {done}/{total}: {text}", file=sys.stderr, flush=True)


def run_tune_zeta(args: argparse.Namespace) -> int:
    """``recon-server tune-zeta``: mean NRMSE per (R, weight); the best per R goes into the card."""
    from recon_server.research.evaluate import tune_weights

    table = tune_weights(
        args.model,
        args.data,
        method=args.method,
        accelerations=args.accel,
        weights=args.zetas,
        subjects=args.subjects,
        slices=args.slices,
        device=args.device,
        write=not args.dry_run,
        diffusion=diffusion_settings(args),
    )
    print(json.dumps(table, indent=1))
    return 0


def run_experiment(args: argparse.Namespace) -> int:
    """``recon-server experiment paper``."""
    from recon_server.research.experiment import run_paper_experiments

    args.diffusion = diffusion_settings(args)  # the evaluations' base settings
    doc = run_paper_experiments(args)
    print(doc["markdown"])
    return 0


def add_experiment_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``recon-server experiment paper``."""
    p.add_argument(
        "--pretrained", type=Path, help="pre-trained checkpoint (else pre-train on --pretrain-data)"
    )
    p.add_argument("--pretrain-data", type=Path, nargs="*", default=[], help="prepared T1/T2/T1POST slices")
    p.add_argument("--contrasts", default="T1,T2,T1POST", help="pre-training contrasts")
    p.add_argument("--flair-data", type=Path, required=True, help="prepared FLAIR slices (training subjects)")
    p.add_argument("--data", type=Path, required=True, help="held-out simulated FLAIR subjects (sub-XXX/)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model-size", default="demo")
    p.add_argument("--target-subjects", type=options.positive_int, default=20, help="N FLAIR subjects")
    p.add_argument("--pretrain-epochs", type=float, default=200.0)
    p.add_argument("--scratch-epochs", type=float, help="scratch/many epochs (default: --pretrain-epochs)")
    p.add_argument("--finetune-epochs", type=float, help="default: 2%% of the pre-training epochs")
    p.add_argument("--finetune-lr", type=float, default=1e-5)
    p.add_argument("--pretrain-lr", type=float, default=1e-4, help="lr of pretrain, scratch, many and joint")
    p.add_argument(
        "--train-steps",
        type=options.positive_int,
        help="optimizer steps of scratch, many and joint (equal compute; overrides their epochs)",
    )
    p.add_argument("--crop", type=options.positive_int, help="train on random square crops of this size")
    p.add_argument(
        "--baselines",
        default="cg-sense,l1-wavelet",
        help="classical methods evaluated once on the same subjects, a comma list from "
        f"{options.METHOD_LIST} (empty: none)",
    )
    p.add_argument("--lrs", type=options.float_list, default=[float(v) for v in PAPER_LRS.split(",")])
    p.add_argument(
        "--lengths",
        type=options.float_list,
        help="fine-tuning epochs for experiment 2 (default: 0.5x, 1x, 2x)",
    )
    p.add_argument("--accel", type=options.int_list, default=[4, 5, 6])
    p.add_argument("--ablation-accel", type=int, default=4)
    p.add_argument(
        "--method", default="dps-fast", help=f"diffusion method evaluated, one of {options.METHOD_LIST}"
    )
    p.add_argument(
        "--subjects", type=options.positive_int, help="held-out subjects to evaluate (default: all)"
    )
    p.add_argument(
        "--slices", type=options.positive_int, help="central slices per held-out subject (default: all)"
    )
    p.add_argument("--batch", type=options.positive_int, default=32)
    p.add_argument("--val-subjects", type=int, default=2)
    p.add_argument("--train-device", default="auto")
    p.add_argument("--only", choices=["1", "2"], help="run only experiment 1 or 2")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep models already trained in OUT/runs (an interrupted experiment goes on where it stopped)",
    )
    add_model_options(p)
