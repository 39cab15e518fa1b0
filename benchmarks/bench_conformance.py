"""Every method on every acquisition convention of the conformance corpus: NRMSE and time.

    .venv/bin/python benchmarks/bench_conformance.py [--dps-steps 24] [--methods ...]

The corpus is the one `make test` reconstructs (tests/integration/conformance/corpus.py: one
simulated two-slice FLAIR subject, 96x96, 8 coils, seed 71, written per convention with
ismrmrd-python's Dataset API). Each file goes through the assembler and ``pipeline.reconstruct``
(the path `serve` and `recon` share); scale-fitted NRMSE of the magnitude inside the head against
the noiseless truth. The diffusion methods use the shipped model with the steps given here.
Prints a markdown table with the command and the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from recon_server.data.acquire import SimulationConfig, simulate_subject
from recon_server.machine import describe as describe_machine
from recon_server.mrd import ismrmrd_io
from recon_server.mrd.assemble import Assembler
from recon_server.recon import methods, pipeline
from recon_server.research.quality import nrmse

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("zero-filled", "cg-sense", "l1-wavelet", "dps", "dps-fast", "dps-warm")


def load_corpus() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "conformance_corpus", ROOT / "tests" / "integration" / "conformance" / "corpus.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--dps-steps", type=int, default=24)
    parser.add_argument("--dps-fast-steps", type=int, default=10)
    parser.add_argument("--dps-warm-steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus = load_corpus()
    diffusion = methods.DiffusionSettings(
        model_dir=ROOT / "models" / "flair-stroke-demo",
        overrides={
            "dps": {"steps": args.dps_steps},
            "dps-fast": {"steps": args.dps_fast_steps},
            "dps-warm": {"steps": args.dps_warm_steps},
        },
    )
    sub = simulate_subject(SimulationConfig(matrix=96, slices=2, coils=8, acceleration=4), seed=71, index=0)
    truth = np.abs(sub.truth)
    head = truth > 0.1 * truth.max()
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {describe_machine()}\n")
    print("| file | R (measured lines) | " + " | ".join(args.methods) + " |")
    print("|---|---|" + "---|" * len(args.methods))
    with tempfile.TemporaryDirectory() as tmp:
        for name, layout in corpus.CASES.items():
            path = corpus.write_case(Path(tmp) / f"{name}.h5", sub, layout(sub))
            raw = ismrmrd_io.read_raw(path)
            asm = Assembler(raw.header_xml)
            for head_row, data in zip(raw.acquisition_headers, raw.data, strict=True):
                asm.add_line(head_row, data)
            (scan,) = asm.finish()
            cells = []
            for method in args.methods:
                t0 = time.perf_counter()
                volume = pipeline.reconstruct_all(
                    scan, method=method, fallback="zero-filled", diffusion=diffusion
                )[0]
                error = nrmse(volume.magnitude, truth, mask=head, fit_scale=True)
                fell_back = "fallback_from" in volume.provenance.settings
                mark = f" ({volume.provenance.method})" if fell_back else ""
                cells.append(f"{error:.4f}{mark} {time.perf_counter() - t0:.1f} s")
            print(f"| {name} | {scan.acceleration:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
