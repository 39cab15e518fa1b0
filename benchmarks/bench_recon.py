"""Reconstruction-core benchmarks: speed vs sigpy and BART, and the regularisation sweep.

    .venv/bin/python benchmarks/bench_recon.py            # speed table, 256x256, 16 coils
    .venv/bin/python benchmarks/bench_recon.py --tune     # lambda sweep that set the defaults

Data: axial slices of the Colin27 head (Debian ``mricron-data`` ``ch2.nii.gz``, 1 mm, with scalp)
zero-padded to 256x256, a smooth random phase, 16 simulated coils (Gaussian sensitivities on a
ring, sum |S|^2 = 1), complex Gaussian noise of standard deviation ``p99(|x|) / snr``, fastMRI
equispaced masks. Coil maps for the reconstructions are our ESPIRiT maps from the ACS block.
Prints markdown tables with the command, the machine and the library versions.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recon_server.machine import describe as describe_machine
from recon_server.recon.classic import (
    CG_SENSE_ITERS,
    L1_WAVELET_ITERS,
    cg_sense,
    l1_wavelet,
    zero_filled,
)
from recon_server.recon.coils import calibration_region, espirit_maps
from recon_server.recon.fft import fft2c
from recon_server.recon.masks import acs_region, equispaced_mask, mask_2d
from recon_server.research.bart import write_cfl
from recon_server.research.quality import nrmse, ssim

# Fixed weights of the speed table (the peers get the same problem); quality: the --tune sweep.
CG_SENSE_LAMBDA = 3e-2
COLIN = Path("/usr/share/mricron/templates/ch2.nii.gz")


# --------------------------------------------------------------------------- data


def head_slices(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` complex ``(n, n)`` axial head slices (Colin27, 1 mm), smooth random phase."""
    if not COLIN.exists():
        sys.exit(f"{COLIN} missing: install the Debian package mricron-data")
    import nibabel as nib

    vol = np.asarray(nib.load(COLIN).dataobj, dtype=np.float64)  # (x, y, z), RAS, 1 mm
    zs = np.linspace(vol.shape[2] * 0.45, vol.shape[2] * 0.7, count).astype(int)
    out = np.zeros((count, n, n), dtype=np.complex64)
    yy, xx = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    for i, z in enumerate(zs):
        img = np.rot90(vol[:, :, z])  # rows = anterior..posterior, cols = right..left
        img = img[: min(n, img.shape[0]), : min(n, img.shape[1])]
        pad = [((n - s) // 2, n - s - (n - s) // 2) for s in img.shape]
        img = np.pad(img, pad) / vol.max()
        c = rng.normal(size=5)
        phase = c[0] + c[1] * xx + c[2] * yy + 0.5 * c[3] * xx * yy + 0.5 * c[4] * (xx**2 - yy**2)
        out[i] = img * np.exp(1j * phase)
    return out


def ring_coils(n: int, coils: int) -> np.ndarray:
    """Smooth complex sensitivities ``(coils, n, n)`` on a ring, normalised to ``sum |S|^2 = 1``."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    maps = []
    for c in range(coils):
        a = 2 * np.pi * c / coils
        z = 0.3 * np.sin(3 * a)
        mag = np.exp(-((yy - 1.2 * np.sin(a)) ** 2 + (xx - 1.2 * np.cos(a)) ** 2 + z**2) / 0.9)
        maps.append(mag * np.exp(1j * (a + 0.8 * (xx * np.cos(a) - yy * np.sin(a)))))
    s = np.stack(maps)
    return (s / np.sqrt((np.abs(s) ** 2).sum(0, keepdims=True))).astype(np.complex64)


def simulate(n: int, coils: int, slices: int, snr: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truth images ``(slices, n, n)`` and fully sampled noisy k-space ``(slices, coils, n, n)``."""
    rng = np.random.default_rng(seed)
    # complex64 throughout, as the service reconstructs (complex128 doubled our solvers' cost)
    x = torch.from_numpy(head_slices(n, slices, rng).astype(np.complex64))
    maps = torch.from_numpy(ring_coils(n, coils))
    k = fft2c(maps[None] * x[:, None])
    sd = float(np.percentile(np.abs(x.numpy()), 99)) / snr
    noise = (rng.normal(size=(*k.shape, 2)) * (sd / np.sqrt(2))).astype(np.float32)
    return x, k + torch.view_as_complex(torch.from_numpy(noise))


def undersample(k: torch.Tensor, accel: int) -> tuple[torch.Tensor, np.ndarray, tuple[int, int]]:
    lines = equispaced_mask(k.shape[-2], accel, offset=0)
    mask = mask_2d(lines, k.shape[-1])
    return k * torch.from_numpy(mask), mask, acs_region(lines)


# --------------------------------------------------------------------------- machine / timing


def timed(fn: Callable[[], object], repeats: int, sync: bool = False) -> float:
    """Median wall time in seconds over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------- speed


def speed(repeats: int) -> None:
    n, coils, accel = 256, 16, 4
    x, k_full = simulate(n, coils, 1, snr=30.0, seed=0)
    k, mask, acs = undersample(k_full, accel)
    calib = calibration_region(k, acs, max_cols=24)
    rows: list[tuple[str, str, str, float, str]] = []

    maps = espirit_maps(calib, (n, n))
    mask_t = torch.from_numpy(mask)
    dev = "cpu"
    rows.append(("ESPIRiT", "ours (torch)", dev, timed(lambda: espirit_maps(calib, (n, n)), repeats), ""))
    rows.append(
        (
            "CG-SENSE",
            "ours (torch)",
            dev,
            timed(lambda: cg_sense(k, maps, mask_t), repeats),
            f"{CG_SENSE_ITERS} it",
        )
    )
    rows.append(
        (
            "L1-wavelet",
            "ours (torch)",
            dev,
            timed(lambda: l1_wavelet(k, maps, mask_t), repeats),
            f"{L1_WAVELET_ITERS} it",
        )
    )
    if torch.cuda.is_available():
        kc, cc, mc, mk = k.cuda(), calib.cuda(), maps.cuda(), mask_t.cuda()
        batch = 16
        cb = cc.expand(batch, -1, -1, -1).contiguous()
        t = timed(lambda: espirit_maps(cb, (n, n)), repeats, sync=True) / batch
        rows.append(("ESPIRiT", "ours (torch)", "cuda", t, f"per slice, batch {batch}"))
        rows.append(
            ("CG-SENSE", "ours (torch)", "cuda", timed(lambda: cg_sense(kc, mc, mk), repeats, True), "")
        )
        rows.append(
            ("L1-wavelet", "ours (torch)", "cuda", timed(lambda: l1_wavelet(kc, mc, mk), repeats, True), "")
        )

    try:
        import sigpy.mri.app as app

        kz = k[0].numpy()
        mps = maps[0].numpy()
        w = mask.astype(np.float32)
        rows.append(
            (
                "ESPIRiT",
                "sigpy 0.1.27",
                "cpu",
                timed(
                    lambda: app.EspiritCalib(kz, calib_width=acs[1] - acs[0], show_pbar=False).run(), repeats
                ),
                "100 power it",
            )
        )
        sense = app.SenseRecon
        rows.append(
            (
                "CG-SENSE",
                "sigpy 0.1.27",
                "cpu",
                timed(
                    lambda: sense(
                        kz, mps, lamda=CG_SENSE_LAMBDA, weights=w, max_iter=CG_SENSE_ITERS, show_pbar=False
                    ).run(),
                    repeats,
                ),
                f"{CG_SENSE_ITERS} it",
            )
        )
        l1 = app.L1WaveletRecon
        rows.append(
            (
                "L1-wavelet",
                "sigpy 0.1.27",
                "cpu",
                timed(
                    lambda: l1(kz, mps, 1e-3, weights=w, max_iter=L1_WAVELET_ITERS, show_pbar=False).run(),
                    repeats,
                ),
                f"{L1_WAVELET_ITERS} it",
            )
        )
    except ImportError:
        rows.append(("all", "sigpy", "-", float("nan"), "sigpy not installed"))

    bart = shutil.which("bart")
    if bart is None:
        rows.append(("all", "BART", "-", float("nan"), "bart not installed (Debian package bart)"))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            write_cfl(d / "ksp", k[0].permute(1, 2, 0).numpy()[:, :, None, :])  # (ky, kx, 1, coils)
            write_cfl(d / "sens", maps[0].permute(1, 2, 0).numpy()[:, :, None, :])
            r = acs[1] - acs[0]

            def run(*args: str) -> None:
                subprocess.run([bart, *args], check=True, capture_output=True)

            rows.append(
                (
                    "ESPIRiT",
                    "BART 0.8 ecalib",
                    "cpu",
                    timed(lambda: run("ecalib", "-m1", "-r", str(r), str(d / "ksp"), str(d / "m")), repeats),
                    f"-m1 -r {r}",
                )
            )
            rows.append(
                (
                    "CG-SENSE",
                    "BART 0.8 pics",
                    "cpu",
                    timed(
                        lambda: run(
                            "pics",
                            "-S",
                            "-l2",
                            "-r",
                            str(CG_SENSE_LAMBDA),
                            "-i",
                            str(CG_SENSE_ITERS),
                            str(d / "ksp"),
                            str(d / "sens"),
                            str(d / "o1"),
                        ),
                        repeats,
                    ),
                    f"-l2 -r {CG_SENSE_LAMBDA} -i {CG_SENSE_ITERS}",
                )
            )
            rows.append(
                (
                    "L1-wavelet",
                    "BART 0.8 pics",
                    "cpu",
                    timed(
                        lambda: run(
                            "pics",
                            "-S",
                            "-R",
                            "W:3:0:0.005",
                            "-i",
                            str(L1_WAVELET_ITERS),
                            str(d / "ksp"),
                            str(d / "sens"),
                            str(d / "o2"),
                        ),
                        repeats,
                    ),
                    f"-R W:3:0:0.005 -i {L1_WAVELET_ITERS}",
                )
            )

    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {describe_machine()}")
    print(
        f"data: one {n}x{n} slice, {coils} coils, R={accel} equispaced, "
        f"ACS {acs[1] - acs[0]} rows; median of {repeats}\n"
    )
    print("| stage | implementation | device | seconds per slice | settings |")
    print("|---|---|---|---|---|")
    for stage, impl, device, sec, note in rows:
        print(f"| {stage} | {impl} | {device} | {sec:.3f} | {note} |")
    print("\nBART times include process start and .cfl file I/O.")


# --------------------------------------------------------------------------- tuning


def tune(
    n: int,
    coils: int,
    slices: int,
    snr: float,
    accels: list[int],
    cg_lams: list[float],
    l1_lams: list[float],
    l1_checks: tuple[int, ...],
) -> None:
    x, k_full = simulate(n, coils, slices, snr=snr, seed=1)
    cg_checks = (10, 20, 30, 50)
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {describe_machine()}")
    print(f"data: {slices} Colin27 slices {n}x{n}, {coils} coils, SNR {snr} (p99/sigma), equispaced masks\n")
    ref = x.abs().numpy()
    print("| R | method | lambda | iters | NRMSE | SSIM |")
    print("|---|---|---|---|---|---|")
    for accel in accels:
        k, mask, acs = undersample(k_full, accel)
        maps = espirit_maps(calibration_region(k, acs), (n, n))
        m = torch.from_numpy(mask)

        def report(name: str, lam: float, iters: int, rec: torch.Tensor, accel: int = accel) -> None:
            row = f"| {accel} | {name} | {lam:g} | {iters} | {nrmse(rec, ref):.4f} | {ssim(rec, ref):.4f} |"
            print(row, flush=True)

        def checkpoints(name: str, lam: float, at: tuple[int, ...]) -> Callable[[int, torch.Tensor], None]:
            def cb(it: int, rec: torch.Tensor) -> None:
                if it + 1 in at:
                    report(name, lam, it + 1, rec)

            return cb

        report("zero-filled", 0.0, 0, zero_filled(k, maps))
        # One run per lambda; the callback scores the iterates at the checkpoints.
        for lam in cg_lams:
            cg_sense(
                k,
                maps,
                m,
                lam=lam,
                iters=max(cg_checks),
                tol=0.0,
                callback=checkpoints("cg-sense", lam, cg_checks),
            )
        for lam in l1_lams:
            l1_wavelet(
                k, maps, m, lam=lam, iters=max(l1_checks), callback=checkpoints("l1-wavelet", lam, l1_checks)
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tune", action="store_true", help="run the regularisation sweep instead")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--coils", type=int, default=16)
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--snr", type=float, default=30.0)
    parser.add_argument("--accels", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    parser.add_argument("--cg-lams", type=float, nargs="*", default=[0.0, 3e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument(
        "--l1-lams", type=float, nargs="*", default=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3e-2]
    )
    parser.add_argument("--l1-checks", type=int, nargs="+", default=[30, 60, 100, 150])
    args = parser.parse_args()
    if args.tune:
        tune(
            args.size,
            args.coils,
            args.slices,
            args.snr,
            args.accels,
            args.cg_lams,
            args.l1_lams,
            tuple(args.l1_checks),
        )
    else:
        speed(args.repeats)


if __name__ == "__main__":
    main()
