"""Denoising quality of trained priors on held-out target slices: the paper's comparison.

For each checkpoint, ``PSNR(D(x + sigma n; sigma, contrast), x)`` at sigma 0.1, 0.5, 1 with fixed
noise (:func:`recon_server.training.validation.validate`: complex error, peak of the clean magnitude,
mean over slices), on the slices of ``--contrast`` in a prepared held-out directory (subjects none of the
models trained on). Expected ordering (arXiv 2603.13007): pre-trained + fine-tuned on 20 close to
"many", clearly above "scratch-20" and above "joint".

    .venv/bin/python benchmarks/bench_denoise.py --data HELDOUT_DIR --contrast FLAIR \\
        --model finetuned=runs/ft/best --model scratch20=runs/scratch/best \\
        --model many=runs/many/best --model joint=runs/joint/best

Train the four models with (see docs/training.md):
    recon-server train pretrain --data PRE --contrasts T1,T2,T1POST --out runs/pre ...
    recon-server train finetune --from runs/pre --data TGT --contrast FLAIR --target-subjects 20 --out runs/ft
    recon-server train pretrain --data TGT --contrasts FLAIR --max-subjects 20 --out runs/scratch ...
    recon-server train pretrain --data TGT --contrasts FLAIR --out runs/many ...
    recon-server train pretrain --data PRE TGT --contrasts T1,T2,T1POST --joint FLAIR --target-subjects 20 \\
        --out runs/joint ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

from recon_server.dpm.checkpoint import load_checkpoint
from recon_server.dpm.edm import SIGMA_DATA
from recon_server.dpm.unet import normalise_contrast
from recon_server.machine import describe as describe_machine
from recon_server.recon.wavelets import soft_threshold, wavelet_forward, wavelet_inverse
from recon_server.training.trainset import Subset, open_training_set
from recon_server.training.validation import VAL_SIGMAS, validate

THRESHOLDS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)  # x sigma, swept per sigma (oracle)


class WaveletDenoiser(nn.Module):
    """Soft-thresholding of the complex db4 detail coefficients at ``factor * sigma`` (baseline)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor
        self.anchor = nn.Parameter(torch.zeros(()))  # validate() asks for a parameter's device
        self.config = type("Config", (), {"sigma_data": SIGMA_DATA})()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: object) -> torch.Tensor:
        z = torch.complex(x[:, 0], x[:, 1])
        approx, details = wavelet_forward(z, wavelet="db4", levels=4)
        t = (self.factor * sigma).reshape(-1, 1, 1, 1)
        shrunk = [soft_threshold(d, t) for d in details]
        out = wavelet_inverse(approx, shrunk, wavelet="db4")
        return torch.stack([out.real, out.imag], dim=1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="prepared held-out slice directory")
    p.add_argument("--contrast", default="FLAIR")
    p.add_argument("--model", action="append", required=True, metavar="LABEL=PATH")
    p.add_argument("--max-slices", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sigmas", default=",".join(f"{s:g}" for s in VAL_SIGMAS), help="comma list")
    p.add_argument("--wavelet", action="store_true", help="add soft-thresholded db4 at its best threshold")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    target = normalise_contrast(args.contrast)
    ds = open_training_set(args.data)
    keep = [i for i in range(len(ds)) if ds.info(i).contrast == target]
    if not keep:
        raise SystemExit(f"{args.data} has no {target} slices")
    held_out = Subset(ds, keep)
    sigmas = tuple(float(v) for v in args.sigmas.split(","))
    subjects = sorted({ds.info(i).subject for i in keep})
    print(f"command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ")
    print(f"machine: {describe_machine()}; device {args.device}  ")
    n_subj = len(subjects)
    print(f"held-out: {len(keep)} {target} slices of {n_subj} subjects (up to {args.max_slices} used)\n")
    cols = " | ".join(f"PSNR@{s:g} dB" for s in sigmas)
    print(f"| model | checkpoint | train subjects ({target}) | epochs | {cols} | mean | s |")
    print("|---|---|---:|---:|" + "---:|" * (len(sigmas) + 2))
    for spec in args.model:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--model needs LABEL=PATH, got {spec!r}")
        model, card = load_checkpoint(path, device=args.device)
        model.contrast_index(target)
        t0 = time.perf_counter()
        m = validate(model, held_out, sigmas=sigmas, batch=args.batch, max_slices=args.max_slices)
        dt = time.perf_counter() - t0
        counts = card.training.get("data", {}).get("train_subjects_per_contrast", {})
        epochs = card.training.get("epochs", float("nan"))
        values = " | ".join(f"{m[f'psnr@{s:g}']:.2f}" for s in sigmas)
        print(
            f"| {label} | {card.name} | {counts.get(target, '?')} | {epochs:.1f} | {values} | "
            f"{m['psnr_mean']:.2f} | {dt:.1f} |",
            flush=True,
        )
    if args.wavelet:
        t0 = time.perf_counter()
        runs = {
            f: validate(
                WaveletDenoiser(f), held_out, sigmas=sigmas, batch=args.batch, max_slices=args.max_slices
            )
            for f in THRESHOLDS
        }
        best = {s: max(runs.values(), key=lambda m: m[f"psnr@{s:g}"])[f"psnr@{s:g}"] for s in sigmas}
        picks = {s: max(runs, key=lambda f: runs[f][f"psnr@{s:g}"]) for s in sigmas}
        values = " | ".join(f"{best[s]:.2f}" for s in sigmas)
        mean = sum(best.values()) / len(best)
        print(
            f"| wavelet | db4 soft threshold, best of {len(THRESHOLDS)} per sigma | - | - | {values} | "
            f"{mean:.2f} | {time.perf_counter() - t0:.1f} |"
        )
        print("\nwavelet thresholds chosen (x sigma): " + ", ".join(f"{s:g}: {picks[s]:g}" for s in sigmas))
    return 0


if __name__ == "__main__":
    sys.exit(main())
