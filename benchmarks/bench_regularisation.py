"""Regularisation chosen from the data: our automatic CG-SENSE / L1-wavelet vs BART tuned by an oracle.

    .venv/bin/python benchmarks/bench_regularisation.py                 # every set, noise level, R
    .venv/bin/python benchmarks/bench_regularisation.py --sets colin-t1 --noise 1 --accels 4
    .venv/bin/python benchmarks/bench_regularisation.py --rule-sweep    # how the constants were fitted

``--rule-sweep``: the first slice of each set, NRMSE at the rule's weight times 2^(k/2),
k = -2..3, for CG-SENSE and L1-wavelet (``classic.cg_penalty``, ``classic.l1_weight``): the data
the rule's constants were fitted on (the L1 constants minimise the worst and the mean ratio of the
rule's error to the best of the row).

Test sets (never the simulator's average brain alone):
- ``colin-t1``: axial slices of the real 0.5 mm Colin27 head (Debian ``mricron-data``
  ``ch2better.nii.gz``) resampled to 256x256 over 240 mm (0.94 mm);
- ``colin-flair``: the same slices in a synthetic FLAIR contrast from a three-class Gaussian
  mixture of the T1 intensities (CSF dark, grey matter above white matter);
- ``simulator``: FLAIR slices of the project's simulator (seed 901; the L1 rule's constants were
  fitted on these rows too, as on the Colin27 ones: not held out).

Each slice gets a smooth random phase, ``--coils`` ring coils (``sum |S|^2 = 1``), complex Gaussian
noise of standard deviation ``p99(|x|) / (40 / noise)`` per k-space sample (``--noise 1`` is a
typical scanner's: SNR 40 in the coil-combined image), an equispaced mask of rate R plus 24
central lines, no noise scan. Coil maps: ours (ESPIRiT) for our solvers, BART ``ecalib -m1 -r24``
for BART's. Metric: scale-fitted NRMSE of the magnitude inside the head. Columns: ours with the
weight rule (no tuning), ours at the best weight of a sweep per slice (``x best``: the rule's
ratio to it; CG-SENSE's Wiener penalty scaled by 2^-3 .. 2^2, L1-wavelet's fixed weights), our
CG-SENSE with a plain Tikhonov penalty at the best weight of a sweep (``identity best``: what the
Wiener penalty gains), BART ``pics -S -R Q:r`` / ``-R W:3:0:l`` at the best weight of a sweep over the
set's slices (an oracle), and seconds per slice. Prints the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from recon_server.machine import describe as describe_machine
from recon_server.recon.classic import cg_sense, l1_wavelet
from recon_server.recon.coils import calibration_region, espirit_maps
from recon_server.recon.fft import fft2c
from recon_server.research.bart import read_cfl, write_cfl
from recon_server.research.quality import nrmse

COLIN_BETTER = Path("/usr/share/mricron/templates/ch2better.nii.gz")
TYPICAL_SNR = 40.0
ACS_LINES = 24
CG_SCALE_SWEEP = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
CG_IDENTITY_SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
L1_SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
BART_L2_SWEEP = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
BART_W_SWEEP = (3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 3e-2, 1e-1)


# --------------------------------------------------------------------------- test sets


def _gmm3(values: np.ndarray, iters: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D three-class Gaussian mixture by EM: (means, sds, weights), means ascending."""
    means = np.percentile(values, [15, 55, 85]).astype(np.float64)
    sds = np.full(3, values.std() / 3)
    weights = np.full(3, 1 / 3)
    for _ in range(iters):
        like = weights * np.exp(-0.5 * ((values[:, None] - means) / sds) ** 2) / sds
        post = like / like.sum(axis=1, keepdims=True).clip(1e-300)
        n = post.sum(axis=0)
        means = (post * values[:, None]).sum(axis=0) / n
        sds = np.sqrt((post * (values[:, None] - means) ** 2).sum(axis=0) / n).clip(1e-3)
        weights = n / n.sum()
    order = np.argsort(means)
    return means[order], sds[order], weights[order]


def colin_slices(count: int, n: int, flair: bool) -> np.ndarray:
    """``count`` axial Colin27 slices (0.5 mm source) at ``n x n`` over 240 mm, magnitude in [0, 1]."""
    if not COLIN_BETTER.exists():
        sys.exit(f"{COLIN_BETTER} missing: install the Debian package mricron-data")
    import nibabel as nib

    vol = np.asarray(nib.load(COLIN_BETTER).dataobj, dtype=np.float32)  # type: ignore[attr-defined]
    zs = np.linspace(vol.shape[2] * 0.45, vol.shape[2] * 0.65, count).astype(int)
    zoom = 0.5 / (240.0 / n)
    out = np.zeros((count, n, n), dtype=np.float32)
    for i, z in enumerate(zs):
        img = np.rot90(ndimage.gaussian_filter(vol[:, :, z], sigma=0.5 / zoom / 2.355))
        img = ndimage.zoom(img, zoom, order=1)[:n, :n]
        pad = [((n - s) // 2, n - s - (n - s) // 2) for s in img.shape]
        out[i] = np.pad(img, pad)
    out /= out.max()
    if flair:
        tissue = out > 0.15
        means, sds, weights = _gmm3(out[tissue])
        like = weights * np.exp(-0.5 * ((out[..., None] - means) / sds) ** 2) / sds
        post = like / like.sum(axis=-1, keepdims=True).clip(1e-30)
        signal = np.array([0.05, 0.85, 0.6])  # CSF, grey, white (ascending T1w intensity)
        out = np.where(tissue, (post * signal).sum(axis=-1), out * 0.3).astype(np.float32)
    return out


def simulator_slices(count: int, n: int) -> np.ndarray:
    from recon_server.data.acquire import SimulationConfig, simulate_subject

    sub = simulate_subject(
        SimulationConfig(matrix=n, slices=count, coils=2, acceleration=2), seed=901, index=0
    )
    mag = np.abs(sub.truth)
    return (mag / mag.max()).astype(np.float32)


def ring_coils(n: int, coils: int) -> np.ndarray:
    """Smooth complex sensitivities ``(coils, n, n)`` on a ring, normalised to ``sum |S|^2 = 1``."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    maps = []
    for c in range(coils):
        a = 2 * np.pi * c / coils
        mag = np.exp(-((yy - 1.2 * np.sin(a)) ** 2 + (xx - 1.2 * np.cos(a)) ** 2) / 0.9)
        maps.append(mag * np.exp(1j * (a + 0.8 * (xx * np.cos(a) - yy * np.sin(a)))))
    s = np.stack(maps)
    return (s / np.sqrt((np.abs(s) ** 2).sum(0, keepdims=True))).astype(np.complex64)


def acquire(
    mag: np.ndarray, coils: int, noise: float, accel: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(undersampled noisy k-space (1, coils, n, n), mask (n, n), complex truth (n, n))."""
    n = mag.shape[-1]
    yy, xx = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    c = rng.normal(size=4)
    truth = (mag * np.exp(1j * (c[0] + c[1] * xx + c[2] * yy + 0.5 * c[3] * xx * yy))).astype(np.complex64)
    k = fft2c(torch.from_numpy(ring_coils(n, coils) * truth[None]))[None]
    sd = float(np.percentile(mag, 99)) * noise / TYPICAL_SNR
    k = k + torch.from_numpy(
        (rng.normal(size=k.shape) + 1j * rng.normal(size=k.shape)).astype(np.complex64)
    ) * (sd / np.sqrt(2))
    lines = np.zeros(n, dtype=bool)
    lines[(n // 2) % accel :: accel] = True
    lines[n // 2 - ACS_LINES // 2 : n // 2 + ACS_LINES // 2] = True
    mask = np.repeat(lines[:, None], n, axis=1)
    return k * torch.from_numpy(mask), torch.from_numpy(mask), truth


def row_rng(noise: float, accel: int, coils: int) -> np.random.Generator:
    """The generator of one row's phases and noise (the BART cache's keys rely on it)."""
    return np.random.default_rng(int(1000 * noise) + 10 * accel + coils)


def our_maps(k: torch.Tensor) -> torch.Tensor:
    """Our ESPIRiT maps from the central ``ACS_LINES`` rows."""
    n = k.shape[-2]
    acs = (n // 2 - ACS_LINES // 2, n // 2 + ACS_LINES // 2)
    return espirit_maps(calibration_region(k, acs), (k.shape[-2], k.shape[-1]))


# --------------------------------------------------------------------------- BART


def bart_maps(k: np.ndarray, bart: str, d: Path) -> None:
    write_cfl(d / "ksp", np.transpose(k, (1, 2, 0))[:, :, None, :])
    subprocess.run(
        [bart, "ecalib", "-m1", "-r", str(ACS_LINES), d / "ksp", d / "sens"], check=True, capture_output=True
    )


def bart_pics(bart: str, d: Path, regularisation: str, n: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    cmd = [
        bart,
        "pics",
        "-S",
        "-R",
        regularisation,
        "-i",
        "100",
        str(d / "ksp"),
        str(d / "sens"),
        str(d / "img"),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return read_cfl(d / "img").reshape(n, n), time.perf_counter() - t0


# --------------------------------------------------------------------------- one row


def bart_errors(
    key: str, cache: dict[str, float], compute: Callable[[], list[tuple[str, float, float]]]
) -> dict[str, float]:
    """BART's errors of one slice, ``{regularisation: nrmse}`` plus ``time`` (median s per pics),
    from ``cache`` when present (BART does not change between runs; our solvers do)."""
    if f"{key}/time" not in cache:
        results = compute()
        for reg, error, _ in results:
            cache[f"{key}/{reg}"] = error
        cache[f"{key}/time"] = float(np.median([t for reg, _, t in results if reg.startswith("W")]))
    prefix = f"{key}/"
    return {k[len(prefix) :]: v for k, v in cache.items() if k.startswith(prefix)}


def run_row(
    name: str,
    slices: np.ndarray,
    coils: int,
    noise: float,
    accel: int,
    bart: str | None,
    cache: dict[str, float],
    bart_only: bool = False,
) -> dict[str, object]:
    rng = row_rng(noise, accel, coils)
    ours: dict[str, list[float]] = {
        k: [] for k in ("cg", "cg_best", "cg_identity", "l1", "l1_best", "t_cg", "t_l1", "t_bart")
    }
    bart_l2: dict[float, list[float]] = {r: [] for r in BART_L2_SWEEP}
    bart_w: dict[float, list[float]] = {r: [] for r in BART_W_SWEEP}
    for index, mag in enumerate(slices):
        k, mask, truth = acquire(mag, coils, noise, accel, rng)
        head = mag > 0.05
        ref = np.abs(truth)

        def error(image: torch.Tensor | np.ndarray, ref: np.ndarray = ref, head: np.ndarray = head) -> float:
            return nrmse(np.abs(np.asarray(image)).reshape(ref.shape), ref, mask=head, fit_scale=True)

        if bart is not None:

            def run_bart(
                k: torch.Tensor = k, error: Callable[..., float] = error, bart: str = bart
            ) -> list[tuple[str, float, float]]:
                with tempfile.TemporaryDirectory(prefix="bench-bart-") as tmp:
                    d = Path(tmp)
                    bart_maps(k[0].numpy(), bart, d)
                    out = []
                    for reg in [f"Q:{r}" for r in BART_L2_SWEEP] + [f"W:3:0:{r}" for r in BART_W_SWEEP]:
                        image, seconds = bart_pics(bart, d, reg, k.shape[-1])
                        out.append((reg, error(image), seconds))
                    return out

            found = bart_errors(f"{name}/{k.shape[-1]}/{coils}/{noise:g}/{accel}/{index}", cache, run_bart)
            for r in BART_L2_SWEEP:
                bart_l2[r].append(found[f"Q:{r}"])
            for r in BART_W_SWEEP:
                bart_w[r].append(found[f"W:3:0:{r}"])
            ours["t_bart"].append(found["time"])
        if bart_only:
            continue
        maps = our_maps(k)
        t0 = time.perf_counter()
        ours["cg"].append(error(cg_sense(k, maps, mask)[0]))
        ours["t_cg"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours["l1"].append(error(l1_wavelet(k, maps, mask)[0]))
        ours["t_l1"].append(time.perf_counter() - t0)
        ours["cg_best"].append(min(error(cg_sense(k, maps, mask, weight_scale=w)[0]) for w in CG_SCALE_SWEEP))
        ours["cg_identity"].append(
            min(error(cg_sense(k, maps, mask, lam=lam)[0]) for lam in CG_IDENTITY_SWEEP)
        )
        ours["l1_best"].append(min(error(l1_wavelet(k, maps, mask, lam=lam)[0]) for lam in L1_SWEEP))
    row: dict[str, object] = {key: float(np.mean(v)) if v else float("nan") for key, v in ours.items()}
    pairs = {"cg_ratio": ("cg", "cg_best"), "l1_ratio": ("l1", "l1_best")}
    for ratio, (auto, best) in pairs.items():
        row[ratio] = max((a / b for a, b in zip(ours[auto], ours[best], strict=True)), default=float("nan"))
    if bart is not None:
        r2 = min(bart_l2, key=lambda r: float(np.mean(bart_l2[r])))
        rw = min(bart_w, key=lambda r: float(np.mean(bart_w[r])))
        row.update(
            bart_l2=float(np.mean(bart_l2[r2])), bart_l2_r=r2, bart_w=float(np.mean(bart_w[rw])), bart_w_l=rw
        )
    return row


def rule_sweep(sets: dict[str, np.ndarray], noises: list[float], accels: list[int], coils: int) -> None:
    """NRMSE at the weight rule x 2^(k/2) per slice (module docstring): the data the constants
    were fitted on."""
    from recon_server.recon.classic import data_scale, l1_weight, pixel_noise, sampled_fraction
    from recon_server.recon.sense import SenseOperator

    steps = [k / 2 for k in range(-2, 4)]
    print("| solver | set | noise | R | " + " | ".join(f"rule x 2^{k:g}" for k in steps) + " | rule / best |")
    print("|---|---|---|---|" + "---|" * (len(steps) + 1))
    for name, slices in sets.items():
        for noise in noises:
            for accel in accels:
                k, mask, truth = acquire(slices[0], coils, noise, accel, row_rng(noise, accel, coils))
                ref, head = np.abs(truth), slices[0] > 0.05
                maps = our_maps(k)
                sigma_zf = pixel_noise(k, mask, data_scale(SenseOperator(maps, mask).adjoint(k)), None)
                l1_lam = float(l1_weight(sigma_zf, sampled_fraction(k, mask)))
                for solver_name in ("cg-sense", "l1-wavelet"):
                    errors = []
                    for step in steps:
                        image = (
                            cg_sense(k, maps, mask, weight_scale=2.0**step)
                            if solver_name == "cg-sense"
                            else l1_wavelet(k, maps, mask, lam=l1_lam * 2.0**step)
                        )
                        errors.append(nrmse(np.abs(image[0].numpy()), ref, mask=head, fit_scale=True))
                    cells = " | ".join(f"{e:.4f}" for e in errors)
                    print(
                        f"| {solver_name} | {name} | {noise:g}x | {accel} | {cells} | "
                        f"{errors[steps.index(0)] / min(errors):.3f} |",
                        flush=True,
                    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", nargs="+", default=["colin-t1", "colin-flair", "simulator"])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.5, 1.0, 3.0, 10.0])
    parser.add_argument("--accels", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--coils", type=int, nargs="+", default=[12])
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--bart-cache", type=Path, help="JSON of BART's errors per slice and weight (read, then extended)"
    )
    parser.add_argument("--bart-only", action="store_true", help="fill the BART cache, skip our solvers")
    parser.add_argument("--rule-sweep", action="store_true", help="how the rule's constants were fitted")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bart = shutil.which("bart")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {describe_machine()}; BART: {bart or 'not installed'}\n")
    sets = {
        name: simulator_slices(args.slices, args.size)
        if name == "simulator"
        else colin_slices(args.slices, args.size, flair=name == "colin-flair")
        for name in args.sets
    }
    if args.rule_sweep:
        rule_sweep(sets, args.noise, args.accels, args.coils[0])
        return
    cache: dict[str, float] = (
        json.loads(args.bart_cache.read_text()) if args.bart_cache and args.bart_cache.exists() else {}
    )
    print(
        "| set | coils | noise | R | cg-sense auto | (x best) | identity best | BART l2 best (r) "
        "| l1-wavelet auto | (x best) | BART W best (lambda) | s/slice cg / l1 / BART W |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[dict[str, object]] = []
    for name, slices in sets.items():
        for coils in args.coils:
            for noise in args.noise:
                for accel in args.accels:
                    r = run_row(name, slices, coils, noise, accel, bart, cache, args.bart_only)
                    rows.append(r)
                    if args.bart_cache:
                        args.bart_cache.write_text(json.dumps(cache, indent=0, sort_keys=True))
                    bart_cells = (
                        (
                            f"{r['bart_l2']:.4f} ({r['bart_l2_r']:g}) | ",
                            f"{r['bart_w']:.4f} ({r['bart_w_l']:g}) | ",
                        )
                        if bart
                        else ("- | ", "- | ")
                    )
                    print(
                        f"| {name} | {coils} | {noise:g}x | {accel} | {r['cg']:.4f} | {r['cg_ratio']:.2f} | "
                        f"{r['cg_identity']:.4f} | "
                        + bart_cells[0]
                        + f"{r['l1']:.4f} | {r['l1_ratio']:.2f} | "
                        + bart_cells[1]
                        + f"{r['t_cg']:.2f} / {r['t_l1']:.2f} / {r['t_bart']:.2f} |",
                        flush=True,
                    )
    if bart and not args.bart_only:
        summarise(rows)


def summarise(rows: list[dict[str, object]]) -> None:
    """The issue's targets over the printed rows: ours <= BART's oracle, within 1.15x of our own
    best weight, and the time per slice against BART's."""

    def values(key: str) -> np.ndarray:
        return np.array([float(r[key]) for r in rows])  # type: ignore[arg-type]

    print(f"\nover {len(rows)} rows:")
    for solver, bart_key, bart_name in (("cg", "bart_l2", "pics -l2"), ("l1", "bart_w", "pics -R W")):
        ratio = values(solver) / values(bart_key)
        within = int((values(f"{solver}_ratio") <= 1.15).sum())
        time_ratio = np.median(values(f"t_{solver}") / values("t_bart"))
        print(
            f"- {solver}: <= BART {bart_name} at its best weight on {int((ratio <= 1).sum())} "
            f"(ours / BART {ratio.min():.2f}-{ratio.max():.2f}); within 1.15x of our own best weight "
            f"on {within}; time per slice ours / BART pics -R W (median) {time_ratio:.2f}"
        )


if __name__ == "__main__":
    main()
