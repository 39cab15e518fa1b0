"""recon-server experiment paper end to end at a toy scale (tiny model, 64x64, a few steps)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

from recon_server.cli.main import main
from recon_server.data.slices import iter_scans, prepare_dataset


def test_experiment_paper_runs_end_to_end(
    flair_eval: Path, tmp_path: Path, simulate_subjects: Callable[..., Path]
) -> None:
    simulate = simulate_subjects
    sim = tmp_path / "sim"
    simulate(sim / "T1", "T1", 2)
    simulate(sim / "T2", "T2", 2)
    simulate(sim / "FLAIR", "FLAIR", 3)
    # A wide calibration block: ESPIRiT needs ~10+ rows at 64x64 (the 0.08 rule gives 5).
    pre = tmp_path / "prep-pre"
    scans = itertools.chain(iter_scans("simulated", sim / "T1"), iter_scans("simulated", sim / "T2"))
    prepare_dataset(scans, pre, center_fraction=0.25)
    flair = tmp_path / "prep-flair"
    prepare_dataset(iter_scans("simulated", sim / "FLAIR"), flair, center_fraction=0.25)
    out = tmp_path / "exp"
    args = ["experiment", "paper", "--pretrain-data", str(pre), "--contrasts", "T1,T2"]
    args += ["--flair-data", str(flair), "--data", str(flair_eval), "--out", str(out)]
    args += [
        "--model-size",
        "tiny",
        "--target-subjects",
        "2",
        "--pretrain-epochs",
        "2",
        "--finetune-epochs",
        "1",
    ]
    args += ["--lrs", "1e-4,1e-5", "--lengths", "1,2", "--accel", "2,4", "--ablation-accel", "4"]
    args += [
        "--subjects",
        "1",
        "--slices",
        "1",
        "--batch",
        "4",
        "--val-subjects",
        "1",
        "--train-device",
        "cpu",
    ]
    args += ["--set", "dps-fast.steps=2", "--baselines", "cg-sense", "--crop", "32", "--train-steps", "3"]
    assert main(args) == 0
    doc = json.loads((out / "experiment.json").read_text())
    assert set(doc["experiment1"]) == {"finetuned-2", "scratch-2", "many", "joint", "cg-sense"}
    for row in doc["experiment1"].values():
        assert set(row) == {"2", "4"} and all(0 < v[0] < 2 for v in row.values())
    assert set(doc["experiment2"]) == {"0.0001", "1e-05"}
    assert all(set(r) == {"1", "2"} for r in doc["experiment2"].values())
    md = (out / "experiment.md").read_text()
    assert "## Experiment 1" in md and "| finetuned-2 |" in md and "## Experiment 2" in md
    card = json.loads((out / "runs" / "finetuned-2" / "last" / "card.json").read_text())
    assert card["contrast_slots"] == ["T1", "T2", "FLAIR"] and card["training"]["mode"] == "finetune"
    # --train-steps gives scratch, many and joint the same number of optimizer steps (equal compute)
    for name in ("scratch-2", "many", "joint"):
        card = json.loads((out / "runs" / name / "last" / "card.json").read_text())
        assert card["training"]["steps"] == 3, name

    # --reuse keeps the trained models (an interrupted experiment goes on) and evaluates again
    finished = out / "runs" / "scratch-2" / "last" / "card.json"
    before = finished.stat().st_mtime_ns
    (out / "experiment.json").unlink()
    assert main([*args, "--reuse", "--only", "1"]) == 0
    assert finished.stat().st_mtime_ns == before
    assert set(json.loads((out / "experiment.json").read_text())["experiment1"]) >= {"scratch-2", "joint"}
