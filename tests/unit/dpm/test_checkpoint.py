"""Checkpoints: bit-exact safetensors round trip, sharding, and card/weights verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recon_server.dpm.checkpoint import (
    CARD_FILE,
    CheckpointError,
    load_checkpoint,
    read_card,
    resolve_checkpoint,
    save_checkpoint,
    sha256_file,
)
from recon_server.dpm.unet import build_denoiser

SLOTS = ["T1", "T2", "T1POST"]


def _trained_looking(seed: int = 0):  # noqa: ANN202
    model = build_denoiser("tiny", SLOTS, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-2)
    return model


def _edit_card(directory: Path, **changes: object) -> None:
    card = json.loads((directory / CARD_FILE).read_text())
    for dotted, value in changes.items():
        target = card
        *path, last = dotted.split("__")
        for key in path:
            target = target[key]
        target[last] = value
    (directory / CARD_FILE).write_text(json.dumps(card))


@pytest.mark.parametrize("shard_bytes", [16 * 2**20, 40_000])
def test_round_trip_is_bit_exact(tmp_path: Path, shard_bytes: int) -> None:
    model = _trained_looking()
    card = save_checkpoint(
        model,
        tmp_path / "ckpt",
        name="unit",
        training={"epochs": 3.0},
        validation={"psnr@0.1": 30.0},
        shard_bytes=shard_bytes,
    )
    files = card.weights["files"]
    if shard_bytes < 100_000:
        assert len(files) > 1 and card.weights["index"] == "model.safetensors.index.json"
        assert all((tmp_path / "ckpt" / f).stat().st_size <= shard_bytes + 20_000 for f in files)
        index = json.loads((tmp_path / "ckpt" / card.weights["index"]).read_text())
        assert set(index["weight_map"]) == set(model.state_dict())
    else:
        assert list(files) == ["model.safetensors"] and card.weights["index"] is None
    for name, digest in files.items():
        assert sha256_file(tmp_path / "ckpt" / name) == digest
    loaded, card2 = load_checkpoint(tmp_path / "ckpt")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert loaded.contrast_slots == tuple(SLOTS)
    assert card2.num_parameters == 108_266 and card2.training == {"epochs": 3.0}
    assert card2.sampler_defaults["tuned"] is False
    x = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.eval()(x, 0.3, "T2"), loaded(x, 0.3, "T2"))
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in (tmp_path / "ckpt").iterdir())


def test_slot_growth_survives_round_trip(tmp_path: Path) -> None:
    model = _trained_looking()
    model.add_contrast_slot("FLAIR")
    save_checkpoint(model, tmp_path / "ft", name="ft")
    loaded, card = load_checkpoint(tmp_path / "ft")
    assert card.contrast_slots == ["T1", "T2", "T1POST", "FLAIR"] and card.architecture["num_slots"] == 4
    assert loaded.contrast_index("flair") == 3
    assert loaded.config.label_gain == model.config.label_gain


def test_mismatched_architecture_fails_clearly(tmp_path: Path) -> None:
    save_checkpoint(_trained_looking(), tmp_path / "c", name="c")
    _edit_card(tmp_path / "c", architecture__base_channels=16)
    with pytest.raises(CheckpointError, match=r"do not match the card's architecture.*shape/dtype mismatch"):
        load_checkpoint(tmp_path / "c")


def test_slot_count_mismatch_fails_clearly(tmp_path: Path) -> None:
    save_checkpoint(_trained_looking(), tmp_path / "c", name="c")
    _edit_card(tmp_path / "c", contrast_slots=["T1", "T2", "T1POST", "FLAIR"])
    with pytest.raises(CheckpointError, match="4 contrast slots.*num_slots=3"):
        load_checkpoint(tmp_path / "c")
    _edit_card(tmp_path / "c", contrast_slots=SLOTS + ["FLAIR"], architecture__num_slots=4)
    with pytest.raises(CheckpointError, match=r"label_net\.0\.weight"):
        load_checkpoint(tmp_path / "c")


def test_changed_weights_fail_the_hash_check(tmp_path: Path) -> None:
    save_checkpoint(_trained_looking(), tmp_path / "c", name="c")
    other = tmp_path / "other"
    save_checkpoint(_trained_looking(seed=1), other, name="o")
    (tmp_path / "c" / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="sha256 of .* does not match the card"):
        load_checkpoint(tmp_path / "c")


def test_missing_or_malformed_card_and_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no model card"):
        resolve_checkpoint(tmp_path)
    save_checkpoint(_trained_looking(), tmp_path / "c", name="c")
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "c" / CARD_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_card(tmp_path / "c")
    (tmp_path / "c" / CARD_FILE).write_text(json.dumps({"name": "x"}))
    with pytest.raises(CheckpointError, match="lacks"):
        read_card(tmp_path / "c")
    save_checkpoint(_trained_looking(), tmp_path / "d", name="d")
    _edit_card(tmp_path / "d", weights__files={"../escape.safetensors": "0" * 64})
    with pytest.raises(CheckpointError, match="must not contain a path"):
        load_checkpoint(tmp_path / "d")


def test_run_directory_resolves_to_best_then_last(tmp_path: Path) -> None:
    save_checkpoint(_trained_looking(), tmp_path / "run" / "last", name="last")
    assert read_card(tmp_path / "run").name == "last"
    save_checkpoint(_trained_looking(), tmp_path / "run" / "best", name="best")
    assert read_card(tmp_path / "run").name == "best"


def test_missing_contrast_slot_is_a_clear_error(tmp_path: Path) -> None:
    save_checkpoint(_trained_looking(), tmp_path / "c", name="c")
    model, _ = load_checkpoint(tmp_path / "c")
    with pytest.raises(
        ValueError, match=r"'FLAIR' is not a slot of this model; its slots are \['T1', 'T2', 'T1POST'\]"
    ):
        model.contrast_index("FLAIR")
