"""Speed of the posterior samplers next to CG-SENSE and BART pics on the same simulated data.

Data: a simulated stroke FLAIR scan (``recon_server.data.acquire``), ``--size`` square, ``--coils``
coils, ``--slices`` slices, fastMRI equispaced mask at ``--accel``; prewhitening and ESPIRiT maps as
in the service (``pipeline``). Model: ``--model`` (default ``models/flair-stroke-demo``) if it
exists, else a random-weight ``demo``-size network (timing only: its images mean nothing).

Timing: every sampler runs ``--measure-steps`` steps on all slices after a one-step warm-up; the
seconds per step are extrapolated linearly to the method's full step count (``--full`` runs the
full schedule instead). Per slice = (time of the run) / slices; per 32-slice volume = per slice x 32
on the CPU (slices are processed in batches of 4 there; said in the output), or a real batched
32-slice run on CUDA (``--device cuda``), where peak GPU memory is also reported. CG-SENSE and BART
(``ecalib`` + ``pics``, process start and file I/O included) run fully.

    .venv/bin/python benchmarks/bench_dps.py --slices 2 --measure-steps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recon_server.data import acquire
from recon_server.machine import describe as describe_machine
from recon_server.recon import engine, methods, noise
from recon_server.recon.classic import cg_sense
from recon_server.recon.pipeline import coil_maps
from recon_server.research.bart import bart_binary, pics
from recon_server.research.evaluate import undersample

VOLUME_SLICES = 32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_model(path: Path, device: torch.device) -> tuple[torch.nn.Module, object, str]:
    if (path / "card.json").is_file():
        model, card = engine.load_model(path, device)
        return model, card, f"{card.name} {card.version} ({path})"  # type: ignore[attr-defined]
    from recon_server.dpm.unet import build_denoiser

    model = (
        build_denoiser("demo", ["T1", "T2", "T1POST", "FLAIR"], seed=0)
        .to(device)
        .eval()
        .requires_grad_(False)
    )
    return model, None, "random-weight demo-size network (models/flair-stroke-demo absent; timing only)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--coils", type=int, default=16)
    p.add_argument("--slices", type=int, default=2, help="slices measured (CUDA: use 32)")
    p.add_argument("--accel", type=int, default=2)
    p.add_argument("--measure-steps", type=int, default=2)
    p.add_argument("--full", action="store_true", help="run every sampler's full schedule")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", type=Path, default=methods.DEFAULT_MODEL_DIR)
    p.add_argument("--methods", default="dps,dps-fast,dps-warm")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = engine.select_device(args.device)

    cfg = acquire.SimulationConfig(
        contrast="FLAIR",
        matrix=args.size,
        slices=args.slices,
        coils=args.coils,
        acceleration=args.accel,
        lesions=True,
        readout_oversampling=1,
    )
    subject = acquire.simulate_subject(cfg, seed=0, index=0)
    from recon_server.scan import KSpaceScan

    full = KSpaceScan(
        kspace=subject.kspace,
        mask=np.ones(subject.kspace.shape[-2:], dtype=bool),
        acs=subject.acs,
        calibration=subject.kspace[..., subject.acs[0] : subject.acs[1], :],
        geometry=subject.geometry,
        header_xml="",
        noise=subject.noise,
        contrast="FLAIR",
    )
    scan = undersample(full, args.accel)
    w = noise.whitening_matrix(torch.from_numpy(scan.noise))  # type: ignore[arg-type]
    k = noise.prewhiten(torch.from_numpy(scan.kspace), w).to(device)
    calib = noise.prewhiten(torch.from_numpy(scan.calibration), w).to(device)
    mask = torch.from_numpy(scan.mask).to(device)
    s = args.slices
    rows: list[tuple[str, str, float, float, str, str]] = []

    sync(device)
    t0 = time.perf_counter()
    maps, maps_name = coil_maps(calib, (args.size, args.size))
    sync(device)
    t_maps = (time.perf_counter() - t0) / s
    rows.append(("ESPIRiT coil maps", "-", t_maps, t_maps * VOLUME_SLICES, "", maps_name))
    t0 = time.perf_counter()
    cg_sense(k, maps, mask)
    sync(device)
    t_cg = (time.perf_counter() - t0) / s
    rows.append(("CG-SENSE (30 it)", "-", t_cg, t_cg * VOLUME_SLICES, "", "measured"))

    model, card, model_desc = load_model(args.model, device)
    peaks: dict[str, float] = {}
    for name in args.methods.split(","):
        method = methods.METHODS[name]
        assert isinstance(method, methods.DiffusionMethod)
        spec, _ = method.spec(card, float(args.accel))
        steps = spec.steps if args.full else min(args.measure_steps, spec.steps)
        warm = dataclasses.replace(spec, steps=1)
        engine.reconstruct_volume(model, "FLAIR", k[:1], maps[:1], mask, warm, device=device)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        res = engine.reconstruct_volume(
            model, "FLAIR", k, maps, mask, dataclasses.replace(spec, steps=steps), device=device
        )
        sync(device)
        elapsed = time.perf_counter() - t0
        init = t_cg * s if spec.warm_sigma is not None else 0.0
        per_slice = ((elapsed - init) * spec.steps / steps + init) / s
        if device.type == "cuda":
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30
        note = "measured" if steps == spec.steps else f"{steps} of {spec.steps} steps measured, extrapolated"
        nfe = f"{spec.steps}" + (" (+backprop)" if spec.backprop else "")
        desc = ", ".join(f"{k_}={v}" for k_, v in spec.describe().items() if k_ not in ("sigma_min", "rho"))
        rows.append(
            (f"{name}: {desc}", nfe, per_slice, per_slice * VOLUME_SLICES, f"batch {res.batch_size}", note)
        )

    if bart_binary() is not None:
        t0 = time.perf_counter()
        pics(
            k.cpu().numpy(),
            calibration_rows=scan.acs[1] - scan.acs[0],
            regularization="W:3:0:0.005",
            iters=50,
        )
        t_b = (time.perf_counter() - t0) / s
        rows.append(
            ("BART 0.8 ecalib -m1 + pics -R W:3:0:0.005 -i 50", "-", t_b, t_b * VOLUME_SLICES, "", "measured")
        )
    else:
        rows.append(("BART pics", "-", float("nan"), float("nan"), "", "bart not installed"))

    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {describe_machine()}; device {device}")
    print(f"model: {model_desc}")
    print(
        f"data: simulated FLAIR, {args.size}x{args.size}, {args.coils} coils, {s} slices measured, "
        f"R={args.accel} equispaced, ACS {scan.acs[1] - scan.acs[0]} rows"
    )
    vol_note = (
        "per slice x 32 (CPU, batches of 4)" if device.type == "cpu" else f"{s} slices batched, x {32 / s:g}"
    )
    print(f"per-volume column: {VOLUME_SLICES} slices = {vol_note}\n")
    print("| stage / sampler | NFE per slice | s per slice | s per 32-slice volume | batch | how |")
    print("|---|---|---|---|---|---|")
    for stage, nfe, per_slice, per_vol, batch, note in rows:
        print(f"| {stage} | {nfe} | {per_slice:.2f} | {per_vol:.1f} | {batch} | {note} |")
    if peaks:
        print("\npeak GPU memory (GiB): " + ", ".join(f"{n} {v:.2f}" for n, v in peaks.items()))


if __name__ == "__main__":
    main()
