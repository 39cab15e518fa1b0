"""recon-server evaluate / tune-zeta on tiny simulated subjects and a tiny checkpoint (CLI end to end)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recon_server.cli.main import main
from recon_server.dpm.checkpoint import load_checkpoint, read_card
from recon_server.recon import methods
from recon_server.research import evaluate


def test_undersampling_follows_the_fastmri_rule(flair_eval: Path) -> None:
    subject = evaluate.load_subject(flair_eval / "sub-101")
    assert subject.truth.shape == (2, 64, 64) and subject.labels is not None
    assert evaluate.load_subject(flair_eval / "sub-101", slices=1).truth.shape == (1, 64, 64)
    scan = evaluate.undersample(subject.scan, 4)
    lines = scan.mask.any(axis=1)
    assert (
        scan.acceleration == 64 / lines.sum() and abs(scan.acceleration - 4) < 0.5
    )  # effective, ACS included
    assert lines[scan.acs[0] : scan.acs[1]].all() and scan.acs[1] - scan.acs[0] == evaluate.MIN_ACS_LINES
    assert np.array_equal(scan.kspace[..., ~lines, :], np.zeros_like(scan.kspace[..., ~lines, :]))
    # sub-101's lesion reaches these 2 slices (sub-100's does not: None, no contrast to measure)
    truth_c = evaluate.lesion_contrast(np.abs(subject.truth), subject.labels)
    assert truth_c is not None and truth_c > 0.2  # a FLAIR stroke lesion is bright against white matter


def test_evaluate_cli_writes_table_json_and_montage(
    flair_eval: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ev"
    code = main(
        [
            "evaluate",
            "--data",
            str(flair_eval),
            "--accel",
            "2,4",
            "--methods",
            "zero-filled,cg-sense,dps,dps-fast",
            "--model",
            str(tiny_model),
            "--set",
            "dps.steps=3",
            "--set",
            "dps-fast.steps=3",
            "--bart",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["methods"] == ["zero-filled", "cg-sense", "dps", "dps-fast", "bart-pics"]
    assert len(doc["results"]) == 2 * 2 * 5  # subjects x R x methods
    for r in doc["results"]:
        assert 0 < r["nrmse"] < 2 and 0 < r["ssim"] <= 1 and np.isfinite(r["psnr"])
    with_lesion = [r for r in doc["results"] if r["lesion_contrast_truth"] is not None]
    assert len(with_lesion) == 2 * 5 and all(r["lesion_contrast_error"] >= 0 for r in with_lesion)
    by = {(r["acceleration"], r["method"]): r for r in doc["summary"]}
    assert by[(4, "dps-fast")]["nfe"] == 3 and by[(4, "cg-sense")]["nfe"] is None
    # More undersampling, more error (a sanity check of the masks and the metric)
    assert by[(2, "zero-filled")]["nrmse"][0] < by[(4, "zero-filled")]["nrmse"][0]
    table = (out / "results.md").read_text()
    assert "| 4 | bart-pics | 2 |" in table and "±" in table
    assert "| R | method |" in capsys.readouterr().out
    for accel in (2, 4):
        png = Image.open(out / f"montage_R{accel}.png")
        assert png.mode == "L" and png.size[0] > 5 * 64 and png.size[1] > 2 * 64


def test_tune_zeta_writes_the_best_weight_into_the_card(
    flair_eval: Path, tiny_model: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    code = main(
        [
            "tune-zeta",
            "--model",
            str(model),
            "--data",
            str(flair_eval),
            "--accel",
            "4",
            "--zetas",
            "0.1,3",
            "--method",
            "dps-fast",
            "--subjects",
            "1",
            "--slices",
            "1",
            "--set",
            "dps-fast.steps=2",
        ]
    )
    assert code == 0
    card = read_card(model)
    section = card.sampler_defaults["dps_fast"]
    assert section["tuned"] is True and set(section["gamma_per_acceleration"]) == {"4"}
    grid = section["tuning"]["grid"]["4"]
    assert section["gamma_per_acceleration"]["4"] == float(min(grid, key=grid.get))
    load_checkpoint(model)  # the rewritten card still verifies
    spec, tuned = methods.METHODS["dps-fast"].spec(card, 4.0)  # type: ignore[attr-defined]
    assert tuned and spec.gamma == section["gamma_per_acceleration"]["4"]
    assert card.sampler_defaults["tuned"] is False  # the faithful DPS entries are untouched
    # A later sweep at another R adds to the table: R=4 keeps its weight and its grid.
    args = ["tune-zeta", "--model", str(model), "--data", str(flair_eval), "--zetas", "0.5"]
    args += ["--method", "dps-fast", "--subjects", "1", "--slices", "1", "--set", "dps-fast.steps=2"]
    assert main([*args, "--accel", "2"]) == 0
    again = read_card(model).sampler_defaults["dps_fast"]
    assert again["gamma_per_acceleration"] == {**section["gamma_per_acceleration"], "2": 0.5}
    assert set(again["tuning"]["grid"]) == {"2", "4"}


def test_evaluate_refuses_bad_input(tmp_path: Path) -> None:
    assert (
        main(["evaluate", "--data", str(tmp_path), "--methods", "zero-filled", "--out", str(tmp_path / "o")])
        == 2
    )
    assert main(["evaluate", "--data", str(tmp_path), "--methods", "nope"]) == 2
