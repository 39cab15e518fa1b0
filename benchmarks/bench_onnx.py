"""Seconds per denoiser evaluation and per slice: torch vs ONNX Runtime (random weights).

For each model size (``tiny``, ``demo``) and matrix, the preconditioned denoiser D(x, sigma, c)
is exported (torchscript exporter: same graph, faster to export) and evaluated on a batch of
slices with torch (no_grad, float32) and with ONNX Runtime on every provider that works here
(CPU; CUDA / TensorRT where a GPU and their libraries exist). Seconds per evaluation is the
median of ``--repeats`` timed calls after one warm-up; seconds per slice = evaluations per slice
(``--evals``, e.g. the steps of a no-backprop sampler) x seconds per evaluation / batch.

    python benchmarks/bench_onnx.py                         # tiny and demo, 256x256, batch 1
    python benchmarks/bench_onnx.py --sizes demo --matrix 320 --batch 4 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from recon_server.dpm.onnx import OnnxDenoiser, export_onnx
from recon_server.dpm.unet import build_denoiser, count_parameters
from recon_server.machine import describe as describe_machine


def _time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up (allocations, ORT graph optimisation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "demo"])
    p.add_argument("--matrix", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--evals", type=int, default=20, help="network evaluations per slice")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch and ORT intra-op threads (0: default)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime as ort

    providers = [["CPUExecutionProvider"]]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.append(["CUDAExecutionProvider", "CPUExecutionProvider"])
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        providers.append(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    rows = []
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 2, args.matrix, args.matrix, generator=gen)
    sigma = torch.full((args.batch,), 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            model = build_denoiser(size, ["T1", "T2", "T1POST", "FLAIR"]).eval()
            params = count_parameters(model)
            for dev in devices:
                m = model.to(dev)
                xd, sd = x.to(dev), sigma.to(dev)
                with torch.no_grad():
                    sec = _time(lambda m=m, xd=xd, sd=sd: m(xd, sd, "FLAIR"), args.repeats)
                rows.append((size, params, f"torch {torch.__version__} ({dev})", sec))
            model = model.to("cpu")
            path = export_onnx(model, Path(tmp) / f"{size}.onnx", exporter="torchscript")
            for prov in providers:
                try:
                    onnx_model = OnnxDenoiser(path, providers=prov, threads=args.threads)
                except (RuntimeError, ValueError) as exc:
                    print(f"skipping {prov[0]}: {exc}", file=sys.stderr)
                    continue
                if onnx_model.provider != prov[0]:
                    print(f"{prov[0]} requested, {onnx_model.provider} active: not timed", file=sys.stderr)
                    continue
                sec = _time(lambda o=onnx_model: o(x, sigma, "FLAIR"), args.repeats)
                rows.append((size, params, f"onnxruntime {ort.__version__} ({onnx_model.provider})", sec))

    cmd = " ".join(["python", *sys.argv])
    print(f"\n`{cmd}`\n")
    threads = args.threads or torch.get_num_threads()
    print(
        f"machine: {describe_machine()}; benchmark threads {threads}, "
        f"load average {os.getloadavg()[0]:.1f}; batch {args.batch} x 2 x {args.matrix} x {args.matrix}, "
        f"float32, {args.evals} evaluations per slice, median of {args.repeats}\n"
    )
    print("| model | parameters | backend (provider) | s / evaluation | s / slice |")
    print("|---|---:|---|---:|---:|")
    for size, params, backend, sec in rows:
        per_slice = sec * args.evals / args.batch
        print(f"| {size} | {params:,} | {backend} | {sec:.4f} | {per_slice:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
