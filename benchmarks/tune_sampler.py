"""Tune the fast diffusion sampler's schedule per acceleration on validation subjects (issue 17).

For each acceleration R, every combination of the ``--grid`` settings of ``dps-fast`` (e.g. warm
start sigma, steps, the noise-calibrated data weight lambda, eta) is run on the same prepared
problems (the service's own steps: retrospective fastMRI undersampling, prewhitening with the
noise scan, ESPIRiT maps; ``recon_server.recon.pipeline``), next to CG-SENSE and L1-wavelet, and scored
by NRMSE of the magnitude against the noiseless reference (``EvalSubject.reference``; scale fit,
whole image; the
evaluation protocol of ``recon_server.research.evaluate``); ``--tolerance`` keeps the fastest setting whose
NRMSE is within that fraction of the best. ``--write`` stores the chosen settings per R in
the model card (``sampler_defaults.dps_fast``), with the grid, so the service runs them.

Validation subjects only (seeds never used for training or for the final test).

    .venv/bin/python benchmarks/tune_sampler.py --data sim/TUNE --model models/flair-stroke-demo \\
        --accels 4 --grid "warm_sigma=0.1,0.2;steps=6,10;data_weight=0.5,1,2;eta=0" --write
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from recon_server.dpm.checkpoint import read_card, update_card_sampler_defaults
from recon_server.machine import describe as describe_machine
from recon_server.recon.methods import DiffusionSettings, ReconProblem, run_method
from recon_server.recon.pipeline import coil_maps, prewhitened, recon_problem
from recon_server.research import quality as metrics
from recon_server.research.evaluate import find_subjects, load_subject, undersample

SECTION = "dps_fast"
KEYS = {
    "warm_sigma": float,
    "sigma_min": float,
    "steps": int,
    "data_weight": float,
    "eta": float,
    "cg_iters": int,
    "gamma": float,
    "renoise": lambda v: bool(int(v)),
}


@dataclass
class Case:
    name: str
    problem: ReconProblem
    truth: np.ndarray
    labels: dict[str, np.ndarray] | None
    calibration_rows: int


def parse_grid(text: str) -> dict[str, list[object]]:
    grid: dict[str, list[object]] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        key, _, values = part.partition("=")
        key = key.strip()
        if key == "warm_start":
            grid[key] = [v.strip() for v in values.split(",")]
        elif key in KEYS:
            grid[key] = [KEYS[key](v) for v in values.split(",")]
        else:
            raise SystemExit(f"unknown grid key {key!r}; known: warm_start, {', '.join(KEYS)}")
    return grid


def prepare(path: Path, accel: int, slices: int, contrast: str | None) -> Case:
    subject = load_subject(path, slices=slices)
    scan = undersample(subject.scan, accel)
    # The service's own steps: prewhitening with the noise scan, coil maps, the methods' input
    # (its acceleration is the effective rate, as the assembler reports it).
    kspace, calib, whitened = prewhitened(scan, "cpu")
    assert whitened, "the validation subjects carry a noise scan"
    maps, _ = coil_maps(calib, (kspace.shape[-2], kspace.shape[-1]))
    labelled = replace(scan, contrast=contrast or scan.contrast)
    problem = recon_problem(labelled, kspace, maps, whitened=True)
    rows = scan.acs[1] - scan.acs[0]
    return Case(f"{path.name} R={accel}", problem, subject.reference, subject.labels, rows)


def score(method: str, cases: list[Case], diffusion: DiffusionSettings) -> tuple[float, float]:
    values, start = [], time.perf_counter()
    for case in cases:
        image = run_method(method, case.problem, diffusion=diffusion).image.abs().numpy()
        values.append(metrics.nrmse(image, case.truth, fit_scale=True))
    slices = sum(c.problem.kspace.shape[0] for c in cases)
    return statistics.fmean(values), (time.perf_counter() - start) / slices


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="simulated validation subjects (simulate)")
    p.add_argument("--model", type=Path, required=True, help="model directory (card.json)")
    p.add_argument("--accels", default="4", help="comma list of R")
    p.add_argument("--subjects", type=int, default=2)
    p.add_argument("--slices", type=int, default=2, help="central slices per subject")
    p.add_argument("--grid", required=True, help='e.g. "warm_sigma=0.1,0.2;steps=6,10;data_weight=1,2"')
    p.add_argument("--contrast", help="contrast slot to use instead of the scan's (e.g. a proxy)")
    p.add_argument("--base", default="", help='fixed settings, e.g. "warm_start=l1-wavelet;eta=0"')
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="keep the fastest setting within this relative NRMSE of the best (e.g. 0.02)",
    )
    p.add_argument("--write", action="store_true", help="store the best settings per R in the card")
    p.add_argument("--json", type=Path, help="write every score here")
    args = p.parse_args()
    torch.manual_seed(0)
    grid = parse_grid(args.grid)
    base = {k: v[0] for k, v in parse_grid(args.base).items()}
    diffusion = DiffusionSettings(model_dir=args.model)
    accels = [int(a) for a in args.accels.split(",")]
    subjects = find_subjects(args.data, limit=args.subjects)
    print(f"command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ")
    print(f"machine: {describe_machine()}; torch threads {torch.get_num_threads()}  ")
    print(f"data: {args.data} ({len(subjects)} subjects x {args.slices} slices); model {args.model}\n")
    report: dict[str, object] = {"grid": {}, "baselines": {}, "best": {}}
    best_per_r: dict[str, dict[str, object]] = {}
    for accel in accels:
        cases = [prepare(s, accel, args.slices, args.contrast) for s in subjects]
        rows = []
        for method in ("cg-sense", "l1-wavelet"):
            nrmse, sec = score(method, cases, diffusion)
            rows.append((method, nrmse, sec))
            report["baselines"][f"{accel}/{method}"] = nrmse  # type: ignore[index]
        keys = list(grid)
        results = []
        for values in itertools.product(*(grid[k] for k in keys)):
            settings = {**base, **dict(zip(keys, values, strict=True))}
            trial = replace(diffusion, overrides={"dps-fast": settings})
            nrmse, sec = score("dps-fast", cases, trial)
            results.append((settings, nrmse, sec))
            label = ", ".join(f"{k}={v}" for k, v in settings.items())
            rows.append((f"dps-fast {label}", nrmse, sec))
            print(f"  R={accel} {label}: {nrmse:.4f} ({sec:.2f} s/slice)", file=sys.stderr, flush=True)
        l1 = report["baselines"][f"{accel}/l1-wavelet"]  # type: ignore[index]
        print(f"### R = {accel}\n\n| method | NRMSE | / L1 | s per slice |\n|---|---:|---:|---:|")
        for name, nrmse, sec in sorted(rows, key=lambda r: r[1]):
            print(f"| {name} | {nrmse:.4f} | {nrmse / l1:.3f} | {sec:.2f} |")
        print()
        best_nrmse = min(r[1] for r in results)
        near = [r for r in results if r[1] <= (1 + args.tolerance) * best_nrmse]
        settings, nrmse, _ = min(near, key=lambda r: r[2])  # the fastest of the (near-)best
        # Keyed by the effective acceleration (lines / measured lines, ACS included): the number
        # the service looks the schedule up by (recon.methods.nearest_acceleration).
        effective = statistics.fmean(c.problem.acceleration for c in cases)
        best_per_r[f"{effective:.2f}"] = {**settings, "nrmse": round(nrmse, 5), "nominal_r": accel}
        report["grid"][str(accel)] = [  # type: ignore[index]
            {**s, "nrmse": round(n, 5), "s_per_slice": round(t, 3)} for s, n, t in results
        ]
    report["best"] = best_per_r
    print("best per R:", json.dumps(best_per_r))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.write:
        defaults = dict(read_card(args.model).sampler_defaults)
        section = dict(defaults.get(SECTION, {}))
        keep = ("nrmse", "nominal_r")
        section["per_acceleration"] = {
            r: {k: v for k, v in b.items() if k not in keep} for r, b in best_per_r.items()
        }
        section["tuned"] = True
        section["tuning"] = {
            "data": str(args.data),
            "subjects": [s.name for s in subjects],
            "slices_per_subject": args.slices,
            "metric": "mean NRMSE (magnitude vs the noiseless reference, scale fit, whole image)",
            "choice": f"fastest setting within {args.tolerance:g} of the best NRMSE",
            "grid": report["grid"],
            "baselines": report["baselines"],
            "command": " ".join(sys.argv),
        }
        defaults[SECTION] = section
        update_card_sampler_defaults(args.model, defaults)
        print(f"wrote the best settings per R into {args.model}/card.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
