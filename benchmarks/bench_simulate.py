"""Simulator and training-slice throughput at real sizes.

Prints a markdown table: seed build (once per process), simulated subjects per minute (simulate +
write raw.h5/reference.h5/truth.npy), and prepared slices per second (ESPIRiT coil combination +
scale + store) for ``--subjects`` subjects of ``--matrix`` x ``--matrix``, ``--coils`` coils,
``--slices`` slices.

    .venv/bin/python benchmarks/bench_simulate.py --subjects 3 --matrix 256 --coils 16 --slices 16
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from recon_server.data import acquire, phantom, slices
from recon_server.machine import describe as describe_machine


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--coils", type=int, default=16)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--oversampling", type=int, default=2, choices=(1, 2))
    parser.add_argument("--contrast", default="FLAIR")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_sim_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        phantom.load_seeds()
        t_seeds = time.perf_counter() - t0
        cfg = acquire.SimulationConfig(
            contrast=args.contrast,
            matrix=args.matrix,
            slices=args.slices,
            coils=args.coils,
            lesions=True,
            readout_oversampling=args.oversampling,
        )
        sim_times, write_times, sizes = [], [], []
        for index in range(args.subjects):
            t0 = time.perf_counter()
            subject = acquire.simulate_subject(cfg, seed=0, index=index)
            t1 = time.perf_counter()
            paths = acquire.write_subject(subject, work / "sim" / subject.subject_id)
            t2 = time.perf_counter()
            sim_times.append(t1 - t0)
            write_times.append(t2 - t1)
            sizes.append(sum(p.stat().st_size for p in paths.values()))
            del subject
        t0 = time.perf_counter()
        index = slices.prepare_dataset(slices.iter_scans("simulated", work / "sim"), work / "prep")
        t_prep = time.perf_counter() - t0
        n_slices = len(index["slices"])  # type: ignore[arg-type]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    per_subject = [a + b for a, b in zip(sim_times, write_times, strict=True)]
    mean = sum(per_subject) / len(per_subject)
    print("# bench_simulate\n")
    print(f"command: `{' '.join([Path(sys.executable).name, *sys.argv])}`\n")
    print(f"machine: {describe_machine()}; device cpu\n")
    print(
        f"size: {args.matrix}x{args.matrix}, {args.coils} coils, {args.slices} slices, "
        f"readout oversampling {args.oversampling}, contrast {args.contrast} with lesions\n"
    )
    print("| stage | value |")
    print("|---|---|")
    print(f"| seed volumes (once per process) | {t_seeds:.1f} s |")
    print(f"| simulate per subject (mean of {args.subjects}) | {sum(sim_times) / len(sim_times):.2f} s |")
    print(f"| write raw + reference + truth per subject | {sum(write_times) / len(write_times):.2f} s |")
    print(f"| files per subject | {sum(sizes) / len(sizes) / 2**20:.0f} MiB |")
    print(f"| **subjects per minute** | **{60.0 / mean:.1f}** |")
    print(f"| 300 subjects (projected) | {300 * mean / 60:.1f} min |")
    print(f"| prepare-data ({n_slices} slices, ESPIRiT + combine + scale + store) | {t_prep:.1f} s |")
    print(f"| **prepared slices per second** | **{n_slices / t_prep:.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
