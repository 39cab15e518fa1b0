"""End to end through ``recon-server``: pretrain, torchrun DDP equivalence, finetune, sample."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from recon_server.cli import main as cli
from recon_server.dpm.checkpoint import read_tensors, read_training_meta

COMMON = [
    "--steps",
    "4",
    "--batch",
    "8",
    "--lr",
    "1e-3",
    "--workers",
    "0",
    "--no-progress",
    "--device",
    "cpu",
    "--cpu-precision",  # the equivalence is about fp32 arithmetic; bf16 rounds per batch shape
    "fp32",
]
PRETRAIN = ["train", "pretrain", "--contrasts", "T1,T2,T1POST", "--model-size", "tiny", "--val-every", "2"]


def _state(run: Path, stem: str) -> dict[str, torch.Tensor]:
    meta = read_training_meta(run / "train_state")
    return read_tensors(run / "train_state", {f"{stem}.safetensors": meta["files"][f"{stem}.safetensors"]})


@pytest.fixture(scope="module")
def single_run(toy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert os.environ.get("WORLD_SIZE") is None
        rc = cli.main([*PRETRAIN, "--data", str(toy_dir), "--out", str(out), *COMMON, "--ckpt-every", "2"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out


def test_torchrun_two_processes_match_one_process(toy_dir: Path, single_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "recon_server.cli", *PRETRAIN, "--data", str(toy_dir), "--out", str(out), *COMMON,
        "--ckpt-every", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stem in ("model", "ema"):
        one, two = _state(single_run, stem), _state(out, stem)
        assert one.keys() == two.keys()
        worst = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert worst < 1e-5, (stem, worst)
        moved = max(float((one[k] - _init[k]).abs().max()) for _init in [_initial_weights()] for k in one)
        assert moved > 1e-4  # the runs did train
    card = json.loads((out / "last" / "card.json").read_text())
    assert card["training"]["hardware"]["world_size"] == 2 and card["training"]["steps"] == 4
    # rank 0 alone wrote the log: one line per log step and validation, no duplicates
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in lines if "step" in r] == [4]
    assert len([r for r in lines if "validation" in r]) == 2


def _initial_weights() -> dict[str, torch.Tensor]:
    from recon_server.dpm.unet import build_denoiser  # noqa: PLC0415

    return build_denoiser("tiny", ["T1", "T2", "T1POST"], seed=0).state_dict()


def test_finetune_then_sample_through_the_cli(
    toy_dir: Path, single_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = json.loads((single_run / "last" / "card.json").read_text())
    assert parent["contrast_slots"] == ["T1", "T2", "T1POST"]
    assert parent["training"]["data"]["train_subjects_per_contrast"] == {"T1": 2, "T1POST": 2, "T2": 2}
    ft = tmp_path / "ft"
    args = ["train", "finetune", "--from", str(single_run), "--data", str(toy_dir), "--contrast", "FLAIR"]
    args += ["--out", str(ft), "--epoch-fraction", "0.5", "--batch", "8", "--workers", "0", "--no-progress"]
    args += ["--val-every", "1", "--device", "cpu"]
    assert cli.main(args) == 0
    card = json.loads((ft / "best" / "card.json").read_text())
    train_slices = 4 * 4  # 6 FLAIR subjects, 2 held out, 4 slices each
    expected_steps = math.ceil(0.5 * parent["training"]["epochs"] * train_slices / 8)
    assert card["training"]["planned_steps"] == expected_steps
    assert card["contrast_slots"] == ["T1", "T2", "T1POST", "FLAIR"]
    assert card["training"]["new_slot"] == {"contrast": "FLAIR", "index": 3, "init": "mean"}
    assert card["training"]["lr_schedule"] == {
        "base_lr": 1e-5, "kind": "constant", "total_steps": expected_steps, "warmup_steps": 0, "min_lr": 0.0,
    }  # fmt: skip
    assert card["training"]["parent"]["epochs"] == parent["training"]["epochs"]
    assert len(card["training"]["data"]["splits"]["FLAIR"]["val_subjects"]) == 2

    png = tmp_path / "samples.png"
    rc = cli.main(["sample", "--model", str(ft), "--contrast", "FLAIR", "--n", "3", "--out", str(png)] + [
        "--size", "16", "--steps", "4", "--device", "cpu", "--save-npy", str(tmp_path / "s.npy"),
    ])  # fmt: skip
    assert rc == 0
    with Image.open(png) as im:
        assert im.mode == "L" and im.size == (2 * 18 + 2, 2 * 18 + 2)

    capsys.readouterr()
    rc = cli.main(
        ["sample", "--model", str(single_run), "--contrast", "FLAIR", "--out", str(png), "--size", "16"]
    )
    assert rc == 2
    assert (
        "'FLAIR' is not a slot of this model; its slots are ['T1', 'T2', 'T1POST']" in capsys.readouterr().err
    )
    rc = cli.main(args)  # same --out again without --resume
    assert rc == 2 and "--resume" in capsys.readouterr().err
