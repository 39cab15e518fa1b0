"""Training throughput (images/s) of the EDM U-Net sizes at a given matrix, on CPU and CUDA.

One timed step is exactly what the training loop does per step: EDM loss forward, backward, Adam
update (bf16 autocast on CUDA, fp32 on CPU), on random 2-channel images of the given size.

    .venv/bin/python benchmarks/bench_train.py                     # demo + paper, 256x256, CPU (+CUDA)
    .venv/bin/python benchmarks/bench_train.py --sizes demo --devices cuda --cuda-batch 32
    .venv/bin/python benchmarks/bench_train.py --cpu-probe cpu-res,cpu --threads 1   # CPU precisions

``--cpu-probe``: the trainer's own start-up measurement (``recon_server.dpm.precision``) of
fp32 / bf16 autocast / channels_last on batch-16 64x64 patches, per size, on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from recon_server.dpm.edm import EDMLoss
from recon_server.dpm.unet import build_denoiser, count_parameters
from recon_server.machine import describe as describe_machine


def time_steps(size: str, device: str, *, batch: int, matrix: int, steps: int, warmup: int) -> dict:
    dev = torch.device(device)
    model = build_denoiser(size, ["T1", "T2", "T1POST"], seed=0).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = EDMLoss()
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, 2, matrix, matrix, device=dev, generator=gen) * 0.5
    labels = torch.nn.functional.one_hot(torch.arange(batch, device=dev) % 3, 3).float()
    amp = dev.type == "cuda"

    def step() -> float:
        z, n = loss_fn.draw(x, generator=gen)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model, x, labels, ln_sigma_noise=z, noise=n).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    return {
        "params": count_parameters(model),
        "s_per_step": dt / steps,
        "img_per_s": batch * steps / dt,
        "peak_gib": peak,
    }


def cpu_probe(sizes: list[str]) -> int:
    from recon_server.dpm.precision import probe_cpu_precision

    print(f"command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ")
    print(f"machine: {describe_machine()}; torch threads {torch.get_num_threads()}  ")
    print("training step (EDM loss fwd + bwd) on batch 16, 64x64 patches, patches/s (best of 3)\n")
    print(
        "| size | params | fp32 | bf16 | fp32 channels_last | bf16 channels_last | chosen | bf16-cl / fp32 |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for size in sizes:
        model = build_denoiser(size, ["T1", "T2", "T1POST"], seed=0)
        chosen = probe_cpu_precision(model, batch=16, crop=64, repeats=3)
        m = chosen.measured or {}
        print(
            f"| {size} | {count_parameters(model) / 1e6:.2f}M | {m['fp32']} | {m['bf16']} | {m['fp32-cl']} | "
            f"{m['bf16-cl']} | {chosen.name} | {m['bf16-cl'] / m['fp32']:.2f} |",
            flush=True,
        )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="demo,paper")
    p.add_argument("--devices", default="cpu,cuda", help="cuda is skipped (with a note) when absent")
    p.add_argument("--matrix", type=int, default=256)
    p.add_argument("--cpu-batch", default="demo=4,paper=1", help="per size, e.g. demo=4,paper=1")
    p.add_argument("--cuda-batch", type=int, default=16)
    p.add_argument("--cpu-steps", type=int, default=2)
    p.add_argument("--cuda-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--cpu-probe", default="", help="sizes to time in every CPU precision (patches/s)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_probe:
        return cpu_probe(args.cpu_probe.split(","))
    cpu_batch = dict(kv.split("=") for kv in args.cpu_batch.split(","))
    print(f"command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ")
    print(f"machine: {describe_machine()}  ")
    print(f"matrix: {args.matrix}x{args.matrix}, 2 channels; step = EDM loss fwd + bwd + Adam  ")
    print(f"load average at start: {os.getloadavg()[0]:.1f} (other jobs share the CPU when > cores)\n")
    print("| size | params | device | precision | batch | s/step | images/s | peak GPU GiB |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for device in args.devices.split(","):
        if device == "cuda" and not torch.cuda.is_available():
            print("| (all) | | cuda | | | not available on this machine | | |")
            continue
        for size in args.sizes.split(","):
            cuda = device == "cuda"
            batch = args.cuda_batch if cuda else int(cpu_batch.get(size, 1))
            r = time_steps(
                size,
                device,
                batch=batch,
                matrix=args.matrix,
                steps=args.cuda_steps if cuda else args.cpu_steps,
                warmup=3 if cuda else 1,
            )
            peak = f"{r['peak_gib']:.1f}" if cuda else ""
            precision = "bf16 autocast" if cuda else "fp32"
            print(
                f"| {size} | {r['params'] / 1e6:.2f}M | {device} | {precision} | {batch} | "
                f"{r['s_per_step']:.2f} | {r['img_per_s']:.2f} | {peak} |",
                flush=True,
            )
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
