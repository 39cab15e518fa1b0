"""Loss and validation curves of training runs against wall-clock hours (PNG), from RUN/log.jsonl.

    .venv/bin/python benchmarks/plot_training.py runs/pre runs/ft --out docs/results/prior_training.png

Left: the EDM-weighted training loss (mean of each logging window); right: the validation PSNR of
the EMA denoiser at each validation sigma. Later runs (fine-tuning) continue the hour axis of the
run before them, so the figure shows the whole pipeline's CPU time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_log(run: Path) -> tuple[list[dict], list[dict]]:
    steps, validations = [], []
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "validation" in record:
            validations.append(record["validation"])
        else:
            steps.append(record)
    return steps, validations


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="run directories, in order")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0.0
    for run in args.runs:
        steps, validations = read_log(run)
        hours = {r["step"]: offset + r["wall_s"] / 3600 for r in steps}
        ax_loss.plot(list(hours.values()), [r["loss"] for r in steps], label=run.name, lw=0.8)
        keys = sorted(k for k in (validations[0] if validations else {}) if k.startswith("psnr@"))
        for key in keys:
            pts = [(hours[v["step"]], v[key]) for v in validations if v["step"] in hours]
            if pts:
                ax_val.plot(*zip(*pts, strict=True), marker="o", ms=3, label=f"{run.name} {key}")
        offset = max(hours.values(), default=offset)
    hours_label = "wall-clock hours (2-core CPU)"
    ax_loss.set(xlabel=hours_label, ylabel="EDM loss", yscale="log", title="training loss")
    ax_val.set(xlabel=hours_label, ylabel="PSNR (dB)", title="validation denoising PSNR")
    ax_loss.legend(fontsize=7)
    ax_val.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
