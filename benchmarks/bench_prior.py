"""The diffusion prior against compressed sensing on held-out simulated stroke FLAIR (issue 17).

Per held-out subject (seeds never used for training or tuning) and acceleration R, on the same
prepared problem (``tune_sampler.prepare``: the service's undersampling, prewhitening, ESPIRiT):
CG-SENSE and L1-wavelet (noise-calibrated weights), ``dps-fast`` with the settings of the model
card, and BART ``pics -S -R W:3:0:lambda`` on the same prewhitened k-space with its own
``ecalib -m1`` maps, for each lambda of ``--bart-lambdas``; BART's row is its best lambda per R
(an oracle: chosen on the test subjects themselves, which ours never are). Metrics on the
magnitude against the noiseless truth after a least-squares scale fit (``recon_server.research.evaluate``):
NRMSE, PSNR, SSIM, and the lesion-to-white-matter contrast error. Time per slice on this machine.

    cd benchmarks && ../.venv/bin/python bench_prior.py --data ../sim/TEST --model ../models/flair-stroke-demo

``--colin-flair N`` replaces the simulated subjects by N slices of the real 0.5 mm Colin27 head in a
synthetic FLAIR contrast (``bench_regularisation.colin_slices``: sharp real cortex, which the
prior, trained on the simulator's blurred average brain, never saw; 12 ring coils, noise of a
typical scanner, R plus 24 central lines, no noise scan: the noise level is estimated from the
data). Never used for training or tuning: it says whether the prior generalises.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tune_sampler import Case, prepare

from recon_server.machine import describe as describe_machine
from recon_server.recon.coils import calibration_region, espirit_maps
from recon_server.recon.methods import DiffusionSettings, ReconProblem, run_method
from recon_server.research import quality as metrics
from recon_server.research.bart import bart_binary, pics
from recon_server.research.evaluate import find_subjects, lesion_contrast, scale_fit


def colin_cases(count: int, accel: int, coils: int = 12) -> list[Case]:
    from bench_regularisation import ACS_LINES, acquire, colin_slices

    rng = np.random.default_rng(17 + accel)
    cases = []
    for i, mag in enumerate(colin_slices(count, 256, flair=True)):
        k, mask, truth = acquire(mag, coils, 1.0, accel, rng)
        acs = (k.shape[-2] // 2 - ACS_LINES // 2, k.shape[-2] // 2 + ACS_LINES // 2)
        maps = espirit_maps(calibration_region(k, acs), (k.shape[-2], k.shape[-1]))
        problem = ReconProblem(kspace=k, maps=maps, mask=mask, acceleration=float(accel), contrast="FLAIR")
        cases.append(Case(f"colin-flair {i}", problem, np.abs(truth)[None], None, ACS_LINES))
    return cases


def scores(image: np.ndarray, case: Case) -> dict[str, float]:
    fit = scale_fit(image, case.truth)
    out = {
        "nrmse": metrics.nrmse(image, case.truth, fit_scale=True),
        "psnr": metrics.psnr(image, case.truth, fit_scale=True),
        "ssim": metrics.ssim(image, case.truth, fit_scale=True),
    }
    got, want = lesion_contrast(image * fit, case.labels), lesion_contrast(case.truth, case.labels)
    if got is not None and want:
        out["lesion_contrast_error"] = abs(got - want) / abs(want)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="simulated held-out subjects (simulate)")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--accels", default="2,4,6")
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--slices", type=int, default=2)
    p.add_argument("--bart-lambdas", default="0.001,0.002,0.005,0.01")
    p.add_argument("--colin-flair", type=int, default=0, help="N real-anatomy slices instead of --data")
    args = p.parse_args()
    if not args.colin_flair and args.data is None:
        p.error("give --data DIR or --colin-flair N")
    diffusion = DiffusionSettings(model_dir=args.model)
    lambdas = [float(v) for v in args.bart_lambdas.split(",") if v]
    have_bart = bart_binary() is not None and bool(lambdas)
    subjects = [] if args.colin_flair else find_subjects(args.data, limit=args.subjects)
    print(f"command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ")
    print(f"machine: {describe_machine()}; torch threads {torch.get_num_threads()}  ")
    what = (
        f"{args.colin_flair} Colin27 FLAIR-contrast slices"
        if args.colin_flair
        else (f"{args.data}: {len(subjects)} subjects x {args.slices} central slices")
    )
    print(f"data: {what}; model {args.model}\n")
    for accel in [int(a) for a in args.accels.split(",")]:
        rows: dict[str, list[dict[str, float]]] = {}
        cases = (
            colin_cases(args.colin_flair, accel)
            if args.colin_flair
            else (prepare(path, accel, args.slices, None) for path in subjects)
        )
        for case in cases:
            n = case.problem.kspace.shape[0]
            for method in ("cg-sense", "l1-wavelet", "dps-fast"):
                start = time.perf_counter()
                image = run_method(method, case.problem, diffusion=diffusion).image.abs().numpy()
                sec = (time.perf_counter() - start) / n
                rows.setdefault(method, []).append({**scores(image, case), "s": sec})
            if have_bart:
                k = case.problem.kspace.numpy()
                for lam in lambdas:
                    start = time.perf_counter()
                    image = np.abs(
                        pics(k, calibration_rows=case.calibration_rows, regularization=f"W:3:0:{lam}")
                    )
                    sec = (time.perf_counter() - start) / n
                    rows.setdefault(f"bart-pics-W {lam:g}", []).append({**scores(image, case), "s": sec})
            print(f"  {case.name} done", file=sys.stderr, flush=True)
        bart_rows = [m for m in rows if m.startswith("bart")]
        best_bart = (
            min(bart_rows, key=lambda m: statistics.fmean(r["nrmse"] for r in rows[m])) if bart_rows else None
        )

        def mean_sd(
            method: str, key: str, rows: dict[str, list[dict[str, float]]] = rows
        ) -> tuple[float, float]:
            values = [r[key] for r in rows[method] if key in r]
            if not values:
                return float("nan"), float("nan")
            return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

        l1 = mean_sd("l1-wavelet", "nrmse")[0]
        bart = mean_sd(best_bart, "nrmse")[0] if best_bart else float("nan")
        print(f"### R = {accel} ({len(rows['cg-sense'])} cases, mean +- sd over cases)\n")
        print(
            "| method | NRMSE | / L1 | / BART best | PSNR dB | SSIM | lesion contrast error | s per slice |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        order = ["cg-sense", "l1-wavelet", "dps-fast", *([best_bart] if best_bart else [])]
        for method in order:
            nr, nr_sd = mean_sd(method, "nrmse")
            ps, ps_sd = mean_sd(method, "psnr")
            ss, ss_sd = mean_sd(method, "ssim")
            le, le_sd = mean_sd(method, "lesion_contrast_error")
            sec, _ = mean_sd(method, "s")
            label = f"{method} (oracle lambda of {len(lambdas)})" if method == best_bart else method
            print(
                f"| {label} | {nr:.4f} +- {nr_sd:.4f} | {nr / l1:.3f} | {nr / bart:.3f} | "
                f"{ps:.2f} +- {ps_sd:.2f} | {ss:.4f} +- {ss_sd:.4f} | {le:.3f} +- {le_sd:.3f} | {sec:.2f} |"
            )
        if bart_rows:
            sweep = ", ".join(f"{m.split()[-1]}: {mean_sd(m, 'nrmse')[0]:.4f}" for m in bart_rows)
            print(f"\nBART lambda sweep (mean NRMSE): {sweep}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
