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
from pathlib import Path
from typing import Any

from recon_server.cli import options

log = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    values = [t.strip() for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return values


def parse_overrides(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["dps.steps=100", "dps-fast.eta=0.5"]`` -> ``{"dps": {"steps": 100}, "dps-fast": {"eta": 0.5}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise ValueError(f"--set takes METHOD.SETTING=VALUE, got {item!r}")
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a bare word, e.g. dps.solver=heun
        out.setdefault(method, {})[name] = parsed
    return out


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="checkpoint directory for the dps methods (default: shipped)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (falls back to the CPU)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="METHOD.SETTING=VALUE",
        help="sampler setting beating the card, e.g. dps.steps=100 (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampler seed")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``recon-server`` parser."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ev = subparsers.add_parser(
        "evaluate", help="compare methods on held-out simulated subjects", formatter_class=fmt
    )
    ev.add_argument("--data", type=Path, required=True, help="directory of sub-XXX/ (recon-server simulate)")
    ev.add_argument("--accel", type=_int_list, default=[2, 4, 5, 6], help="accelerations, e.g. 2,4,5,6")
    ev.add_argument(
        "--methods", type=_str_list, default=["zero-filled", "cg-sense", "l1-wavelet", "dps", "dps-fast"]
    )
    ev.add_argument("--bart", action="store_true", help="add BART pics as an outside reference")
    ev.add_argument("--subjects", type=options.positive_int, help="at most this many subjects (sorted)")
    ev.add_argument("--slices", type=options.positive_int, help="only this many central slices per subject")
    ev.add_argument("--out", type=Path, default=Path("eval-out"), help="results.json/.md and montages")
    _model_options(ev)
    ev.set_defaults(func=run_evaluate)

    tz = subparsers.add_parser(
        "tune-zeta",
        help="sweep the data-consistency weight per R, write the best into the card",
        formatter_class=fmt,
    )
    tz.add_argument("--model", type=Path, required=True, help="checkpoint directory (its card is updated)")
    tz.add_argument("--data", type=Path, required=True, help="validation subjects (sub-XXX/)")
    tz.add_argument("--accel", type=_int_list, default=[2, 4, 5, 6])
    tz.add_argument("--zetas", type=_float_list, required=True, help="weights to try, e.g. 0.3,1,3")
    tz.add_argument("--method", choices=["dps", "dps-fast", "dps-warm"], default="dps")
    tz.add_argument("--subjects", type=options.positive_int, default=2)
    tz.add_argument("--slices", type=options.positive_int, default=4)
    tz.add_argument("--dry-run", action="store_true", help="print the sweep, leave the card alone")
    tz.add_argument("--device", default="cpu")
    tz.add_argument("--set", dest="overrides", action="append", metavar="METHOD.SETTING=VALUE")
    tz.add_argument("--seed", type=int, default=0)
    tz.set_defaults(func=run_tune_zeta)

    exp = subparsers.add_parser(
        "experiment", help="the paper's experiments at a small scale", formatter_class=fmt
    )
    kinds = exp.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    from recon_server.research.experiment import add_arguments

    paper = kinds.add_parser(
        "paper", help="fine-tuned vs scratch vs many vs joint; lr x length", formatter_class=fmt
    )
    add_arguments(paper)
    paper.set_defaults(func=run_experiment)


def _configure(args: argparse.Namespace) -> None:
    from recon_server.recon.methods import configure_diffusion

    configure_diffusion(
        model_dir=getattr(args, "model", None),
        overrides=parse_overrides(getattr(args, "overrides", None)),
        seed=args.seed,
    )


def run_evaluate(args: argparse.Namespace) -> int:
    """``recon-server evaluate``: prints the summary table, writes results into ``--out``."""
    from recon_server.research.evaluate import markdown_table, run_evaluation

    _configure(args)
    doc = run_evaluation(
        args.data,
        accelerations=args.accel,
        methods=args.methods,
        out_dir=args.out,
        subjects=args.subjects,
        slices=args.slices,
        bart=args.bart,
        device=args.device,
    )
    print(markdown_table(doc["summary"]))  # type: ignore[arg-type]
    print(f"\nwritten: {args.out}/results.json, results.md, montage_R*.png")
    return 0


def run_tune_zeta(args: argparse.Namespace) -> int:
    """``recon-server tune-zeta``: mean NRMSE per (R, weight); the best per R goes into the card."""
    from recon_server.research.evaluate import tune_weights

    _configure(args)
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
    )
    print(json.dumps(table, indent=1))
    return 0


def run_experiment(args: argparse.Namespace) -> int:
    """``recon-server experiment paper``."""
    from recon_server.research.experiment import run_paper_experiments

    _configure(args)
    doc = run_paper_experiments(args)
    print(doc["markdown"])
    return 0
