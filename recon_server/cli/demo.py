"""``recon-server demo`` (``make demo``): a 2x stroke FLAIR scan from simulation to DICOM, with quality.

Stages (each through the project's public commands, as a user would run them):

1. ``recon-server simulate``: one FLAIR subject with stroke lesions, prospectively 2x undersampled
   (ISMRMRD raw file with noise scan and calibration lines) plus its noiseless truth.
2. ``recon-server serve`` in a child process: the MRD stream server, writing DICOM.
3. ``recon-server replay``: streams the raw file to the server and saves the returned images.
4. Quality: NRMSE / PSNR / SSIM of the returned magnitude images against the noiseless truth
   times the prewhitened coil weighting (``coil_weight.npy``: what the data determine, see
   ``recon_server.research.evaluate``; conventions in ``recon_server.research.quality``:
   least-squares scale fit, head mask), next to zero-filled, CG-SENSE and L1-wavelet of the same
   file. The server uses
   the shipped diffusion model (``dps-fast``) when ``models/flair-stroke-demo`` is installed,
   CG-SENSE otherwise, and says which.
5. DICOM: the series the server wrote, checked with ``dciodvfy`` when dicom3tools is installed.
6. ``preview.png``: truth | reconstruction | 5x error, for three slices, each titled (method,
   slice, NRMSE of that slice).

The reconstruction and metric modules (torch) are imported when the demo runs, not when
``recon-server`` builds its parser.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recon_server.cli import options

SERVER_START_TIMEOUT_S = 120.0


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def start_server(args: Sequence[str]) -> tuple[subprocess.Popen[str], int]:
    """Start ``recon-server serve`` on a free port; returns the process and the port it bound."""
    cmd = [sys.executable, "-m", "recon_server.cli", "serve", "--port", "0", "--http-port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        print(f"   server: {line.rstrip()}", flush=True)
        if "MRD stream server on" in line:
            return proc, int(line.rsplit(":", 1)[1])
    proc.kill()
    proc.wait()
    proc.stdout.close()
    raise RuntimeError(f"recon-server serve did not start (exit code {proc.returncode})")


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def quality_rows(images: dict[str, np.ndarray], truth: np.ndarray) -> list[tuple[str, float, float, float]]:
    """(name, NRMSE, PSNR, SSIM) per reconstruction, in the head mask with a scale fit."""
    from recon_server.research import quality as metrics

    mask = head_mask(truth)
    return [
        (
            name,
            metrics.nrmse(img, truth, mask=mask, fit_scale=True),
            metrics.psnr(img, truth, mask=mask, fit_scale=True),
            metrics.ssim(img, truth, mask=mask, fit_scale=True),
        )
        for name, img in images.items()
    ]


def offline_baselines(raw: Path, methods: Sequence[str]) -> dict[str, np.ndarray]:
    """The same raw file reconstructed in this process by each named method (for comparison)."""
    from recon_server.mrd import ismrmrd_io
    from recon_server.mrd.assemble import Assembler
    from recon_server.recon.pipeline import reconstruct

    scan_file = ismrmrd_io.read_raw(raw)
    assembler = Assembler(scan_file.header_xml)
    for head, data in zip(scan_file.acquisition_headers, scan_file.data, strict=True):
        assembler.add_line(head, data)
    scans = assembler.finish()
    return {m: np.concatenate([reconstruct(s, method=m).magnitude for s in scans]) for m in methods}


def head_mask(truth: np.ndarray) -> np.ndarray:
    """The pixels the quality numbers count: above 5 % of the truth's 99.5th percentile."""
    return truth > 0.05 * float(np.percentile(truth, 99.5))


def default_method() -> tuple[str, str]:
    """(method, why): the shipped diffusion model's fast sampler when it is installed, else CG-SENSE."""
    from recon_server.recon.methods import DiffusionSettings

    model = DiffusionSettings().model_directory()
    if (model / "card.json").is_file():
        return "dps-fast", f"the shipped diffusion model ({model.name})"
    return "cg-sense", f"no diffusion model at {model}: CG-SENSE instead of DPS"


def validate_dicom(files: list[Path]) -> str:
    """dciodvfy over every file: a one-line verdict."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        return "dciodvfy not installed (Debian package dicom3tools): not validated"
    errors = 0
    for f in files:
        result = subprocess.run([tool, str(f)], capture_output=True, text=True, check=False)
        errors += sum(line.startswith("Error") for line in (result.stdout + result.stderr).splitlines())
    return f"dciodvfy: {errors} errors in {len(files)} files"


def write_demo_preview(
    path: Path, truth: np.ndarray, recon: np.ndarray, method: str
) -> tuple[Path, list[int]]:
    """``preview.png``: for three slices (rows), truth | reconstruction (scale fitted) | 5x |error|,
    titled with the method, the slice and its NRMSE (as in the quality table). Returns the path
    and the slices shown."""
    from recon_server.research import quality as metrics
    from recon_server.research.preview import Panel, write_titled_sheet

    picks = [int(k) for k in np.linspace(0, truth.shape[0] - 1, 3).round().astype(int)]
    mask = head_mask(truth)
    panels = []
    for k in picks:
        scale = float(np.vdot(recon[k], truth[k]).real / max(np.vdot(recon[k], recon[k]).real, 1e-12))
        error = metrics.nrmse(recon[k], truth[k], mask=mask[k], fit_scale=True)
        white = float(np.percentile(truth[k], 99.5)) or 1.0  # one grey scale per row
        panels += [
            Panel(truth[k], f"truth, slice {k}", white),
            Panel(scale * recon[k], f"{method}, slice {k}, NRMSE {error:.3f}", white),
            Panel(5 * np.abs(scale * recon[k] - truth[k]), f"5x |error|, slice {k}", white),
        ]
    png = write_titled_sheet(
        path,
        panels,
        columns=3,
        title=f"recon-server demo: 2x stroke FLAIR, {method} (server) vs noiseless truth",
    )
    return png, picks


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``recon-server`` parser."""
    p = subparsers.add_parser(
        "demo",
        help="simulate a 2x stroke FLAIR scan, reconstruct it through the server, check the DICOM",
        description=(__doc__ or "").splitlines()[0].replace("``", ""),
        formatter_class=options.HelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (replaced)")
    p.add_argument("--matrix", type=int, default=256, help="in-plane matrix of the simulated scan")
    p.add_argument("--coils", type=int, default=16, help="receive coils")
    p.add_argument("--slices", type=int, default=8, help="slices")
    p.add_argument("--seed", type=int, default=2026, help="simulator seed")
    p.add_argument(
        "--method",
        default=None,
        help=f"the server's FLAIR reconstruction, one of {options.METHOD_LIST} "
        "(default: dps-fast when the shipped model is installed, else cg-sense)",
    )
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """``recon-server demo``: the stages of the module docstring; exit 0 when all passed.

    ``args.run`` is ``recon-server``'s own entry (:func:`recon_server.cli.main.main`), which runs
    the other subcommands."""
    from recon_server.recon.methods import DiffusionSettings

    run = args.run

    out: Path = args.out
    if args.method is None:
        args.method, why = default_method()
        print(f"demo: FLAIR is reconstructed with {args.method}: {why}")
    if out.exists():
        shutil.rmtree(out)
    timings: dict[str, float] = {}

    t = _stage(f"1. simulate a 2x stroke FLAIR scan ({args.matrix}x{args.matrix}, {args.coils} coils)")
    rc = run(
        ["simulate", "--out", str(out / "scan"), "--subjects", "1", "--contrast", "FLAIR", "--lesions"]
        + ["--accel", "2", "--matrix", str(args.matrix), "--coils", str(args.coils)]
        + ["--slices", str(args.slices), "--seed", str(args.seed)]
    )
    if rc:
        return rc
    subject = out / "scan" / "sub-000"
    timings["simulate"] = time.perf_counter() - t

    t = _stage(f"2. start the MRD stream server (FLAIR -> {args.method}, DICOM -> {out / 'dicom'})")
    serve_args = ["--method-for", f"FLAIR={args.method}", "--dicom-dir", str(out / "dicom")]
    if args.method.startswith("dps"):
        serve_args += ["--model-dir", str(DiffusionSettings().model_directory())]
    server, port = start_server(serve_args)
    try:
        t = _stage(f"3. stream {subject / 'raw.h5'} to 127.0.0.1:{port}")
        rc = run(["replay", str(subject / "raw.h5"), "--port", str(port), "--out", str(out / "replay")])
        timings["stream + reconstruct"] = time.perf_counter() - t
    finally:
        stop_server(server)
    if rc:
        print("demo: the server reported an error (see above)", file=sys.stderr)
        return rc

    t = _stage("4. quality against the simulation's noiseless truth")
    truth = np.abs(np.load(subject / "truth.npy"))
    if (subject / "coil_weight.npy").is_file():  # what the prewhitened data determine (evaluate.py)
        truth = truth * np.load(subject / "coil_weight.npy")
    recon = np.load(out / "replay" / "images.npy")
    baselines = [m for m in ("zero-filled", "cg-sense", "l1-wavelet") if m != args.method]
    images = offline_baselines(subject / "raw.h5", baselines)
    images[f"{args.method} (server)"] = recon
    rows = quality_rows(images, truth)
    print("| reconstruction | NRMSE | PSNR (dB) | SSIM |\n|---|---|---|---|")
    for name, e, p, s in rows:
        print(f"| {name} | {e:.4f} | {p:.2f} | {s:.4f} |")
    print("(magnitude, head mask, least-squares scale fit; see recon_server/research/quality.py)")
    timings["quality"] = time.perf_counter() - t

    _stage("5. DICOM written by the server")
    files = sorted((out / "dicom").glob("*/IM*.dcm"))
    print(f"{len(files)} files in {sorted({f.parent.name for f in files})}")
    print(validate_dicom(files))
    if len(files) != recon.shape[0]:
        print(f"demo: expected {recon.shape[0]} DICOM files, found {len(files)}", file=sys.stderr)
        return 1

    _stage("6. preview")
    png, picks = write_demo_preview(out / "preview.png", truth, recon, args.method)
    print(f"{png}: rows = slices {picks}; columns = truth | {args.method} | 5x |error|")

    print("\n== timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return 0
