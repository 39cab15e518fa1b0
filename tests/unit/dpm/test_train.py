"""Training loop: the loss falls, resume is exact, schedules and EMA, data order, fine-tuning."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from recon_server.dpm.checkpoint import read_tensors, read_training_meta
from recon_server.dpm.edm import EDMLoss
from recon_server.dpm.unet import EDMDenoiser, build_denoiser
from recon_server.training.config import TrainConfig, steps_for_epochs
from recon_server.training.schedule import EMA, LRSchedule
from recon_server.training.train import train
from recon_server.training.trainset import (
    SliceSet,
    StepBatchSampler,
    TensorSliceSet,
    crop_batch,
    crop_offsets,
    global_batch_positions,
    mix_seed,
    open_training_set,
    split_subjects,
    write_npy_slice_set,
)
from recon_server.training.validation import VAL_SEED, validate


def _config(steps: int, **kw: object) -> TrainConfig:
    base: dict = dict(
        mode="pretrain",
        total_steps=steps,
        global_batch=8,
        lr=LRSchedule(base_lr=2e-3, total_steps=steps),
        ema_halflife_images=200.0,
        log_every=2,
        val_every=0,
        ckpt_every=1000,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def fixed_loss(model: EDMDenoiser, ds: TensorSliceSet) -> float:
    """EDM loss on all slices at fixed sigmas with fixed noise."""
    x = ds.images
    labels = [model.contrast_index(c) for c in ds.contrasts]
    gen = torch.Generator().manual_seed(7)
    total = 0.0
    with torch.no_grad():
        for s in (0.2, 0.5, 1.0, 2.0):
            noise = torch.randn(x.shape, generator=gen)
            total += float(
                EDMLoss().at_sigma(model, x, labels, sigma=torch.full((x.shape[0],), s), noise=noise).mean()
            )
    return total / 4


def test_loss_falls_on_a_toy_set(toy_set: TensorSliceSet, tmp_path: Path) -> None:
    model = build_denoiser("tiny", ["T1", "T2"], seed=0)
    before = fixed_loss(model, toy_set)
    summary = train(model, toy_set, config=_config(40), out_dir=tmp_path / "run")
    after = fixed_loss(model.eval(), toy_set)
    assert after < 0.6 * before, (before, after)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 20 and min(losses[-3:]) < losses[0]
    assert all(r["lr"] == 2e-3 for r in records) and all(r["img_per_s"] > 0 for r in records)
    assert summary["steps"] == 40 and math.isfinite(summary["final_loss"])


def _tensors(run: Path, stem: str) -> dict[str, torch.Tensor]:
    meta = read_training_meta(run / "train_state")
    return read_tensors(run / "train_state", {f"{stem}.safetensors": meta["files"][f"{stem}.safetensors"]})


def test_resume_continues_identically(toy_set: TensorSliceSet, tmp_path: Path) -> None:
    # Dropout on, cosine schedule and EMA ramp-up: every stochastic and step-dependent part is live.
    cfg = _config(6, lr=LRSchedule(base_lr=1e-3, kind="cosine", total_steps=6), ckpt_every=3)
    straight = build_denoiser("tiny", ["T1", "T2"], seed=1, dropout=0.2)
    train(straight, toy_set, config=cfg, out_dir=tmp_path / "a")
    first = build_denoiser("tiny", ["T1", "T2"], seed=1, dropout=0.2)
    train(first, toy_set, config=_config(6, **{**cfg.__dict__, "stop_at_step": 4}), out_dir=tmp_path / "b")
    assert read_training_meta(tmp_path / "b" / "train_state")["step"] == 4
    with pytest.raises(ValueError, match="--resume"):
        train(first, toy_set, config=cfg, out_dir=tmp_path / "b")
    resumed = build_denoiser("tiny", ["T1", "T2"], seed=99, dropout=0.2)  # weights come from the state
    train(resumed, toy_set, config=cfg, out_dir=tmp_path / "b", resume=True)
    for stem in ("model", "ema", "optimizer"):
        a, b = _tensors(tmp_path / "a", stem), _tensors(tmp_path / "b", stem)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), stem
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert lrs == [cfg.lr.lr_at(1), cfg.lr.lr_at(3), cfg.lr.lr_at(5)]  # logged at steps 2, 4, 6: no restart
    with pytest.raises(ValueError, match="cannot resume: global_batch"):
        train(resumed, toy_set, config=_config(6, global_batch=4), out_dir=tmp_path / "b", resume=True)


def test_lr_schedules() -> None:
    const = LRSchedule(base_lr=1e-5, total_steps=100)
    assert [const.lr_at(k) for k in (0, 50, 99, 500)] == [1e-5] * 4
    cos = LRSchedule(base_lr=1e-4, kind="cosine", total_steps=100, min_lr=1e-6)
    assert cos.lr_at(0) == pytest.approx(1e-4)  # starts at the base lr: no warm-up from zero
    assert cos.lr_at(50) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    assert cos.lr_at(100) == pytest.approx(1e-6)
    warm = LRSchedule(base_lr=1e-4, total_steps=100, warmup_steps=10)
    assert warm.lr_at(0) == pytest.approx(1e-5) and warm.lr_at(9) == pytest.approx(1e-4)
    assert warm.lr_at(10) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="schedule"):
        LRSchedule(base_lr=1e-4, kind="warmup-restart")
    with pytest.raises(ValueError, match="positive"):
        LRSchedule(base_lr=0.0)


def test_ema_halflife_in_images() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, halflife_images=64, rampup_ratio=None)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for k in range(8):  # 8 steps of 8 images = one half-life
        ema.update(model, images_seen=8 * (k + 1), batch=8)
    assert float(ema.model.weight) == pytest.approx(0.5, rel=1e-6)
    ramped = EMA(model, halflife_images=1e6, rampup_ratio=0.05)
    assert ramped.beta(images_seen=1000, batch=10) == pytest.approx(0.5 ** (10 / 50))
    assert ramped.beta(images_seen=10**9, batch=10) == pytest.approx(0.5 ** (10 / 1e6))


def test_global_batches_cover_epochs_and_split_over_ranks() -> None:
    n, gb = 10, 4
    stream = [i for step in range(5) for i in global_batch_positions(step, n=n, global_batch=gb, seed=3)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # reshuffled per epoch
    for world in (1, 2, 4):
        shares = [
            list(
                StepBatchSampler(
                    n, global_batch=gb, rank=r, world_size=world, seed=3, start_step=2, total_steps=5
                )
            )
            for r in range(world)
        ]
        for k in range(3):
            merged = [i for r in range(world) for i in shares[r][k]]
            assert merged == global_batch_positions(2 + k, n=n, global_batch=gb, seed=3)
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(n, global_batch=5, rank=0, world_size=2, seed=0, start_step=0, total_steps=1)
    assert steps_for_epochs(2.0, n_slices=10, global_batch=4) == 5


def test_random_crops_are_windows_fixed_by_the_step() -> None:
    x = torch.arange(4 * 2 * 10 * 12, dtype=torch.float32).reshape(4, 2, 10, 12)
    corners = crop_offsets(7, global_batch=4, size=(10, 12), crop=6, seed=5)
    assert torch.equal(corners, crop_offsets(7, global_batch=4, size=(10, 12), crop=6, seed=5))
    assert not torch.equal(corners, crop_offsets(8, global_batch=4, size=(10, 12), crop=6, seed=5))
    assert int(corners[:, 0].max()) <= 4 and int(corners[:, 1].max()) <= 6 and int(corners.min()) >= 0
    out = crop_batch(x, corners, 6)
    assert out.shape == (4, 2, 6, 6)
    for b, (r, c) in enumerate(corners.tolist()):
        assert torch.equal(out[b], x[b, :, r : r + 6, c : c + 6])
    # rank shares of the global batch's corners reassemble the one-process crops
    halves = [crop_batch(x[k : k + 2], corners[k : k + 2], 6) for k in (0, 2)]
    assert torch.equal(torch.cat(halves), out)
    many = crop_offsets(0, global_batch=2000, size=(10, 12), crop=6, seed=0)
    assert set(many[:, 0].tolist()) == set(range(5)) and set(many[:, 1].tolist()) == set(range(7))
    with pytest.raises(ValueError, match="crop 11"):
        crop_offsets(0, global_batch=1, size=(10, 12), crop=11, seed=0)


def test_crop_training_resumes_identically(toy_set: TensorSliceSet, tmp_path: Path) -> None:
    cfg = _config(4, crop=8, ckpt_every=2)
    straight = build_denoiser("tiny", ["T1", "T2"], seed=1)
    train(straight, toy_set, config=cfg, out_dir=tmp_path / "a")
    first = build_denoiser("tiny", ["T1", "T2"], seed=1)
    train(first, toy_set, config=_config(4, crop=8, ckpt_every=2, stop_at_step=2), out_dir=tmp_path / "b")
    resumed = build_denoiser("tiny", ["T1", "T2"], seed=1)
    train(resumed, toy_set, config=cfg, out_dir=tmp_path / "b", resume=True)
    a, b = _tensors(tmp_path / "a", "model"), _tensors(tmp_path / "b", "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    uncropped = build_denoiser("tiny", ["T1", "T2"], seed=1)
    train(uncropped, toy_set, config=_config(4, ckpt_every=2), out_dir=tmp_path / "c")
    c = _tensors(tmp_path / "c", "model")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the crop changes what is trained on
    with pytest.raises(ValueError, match="cannot resume: crop"):
        train(resumed, toy_set, config=_config(4, crop=12, ckpt_every=2), out_dir=tmp_path / "b", resume=True)


def test_subject_split_is_deterministic_and_disjoint(make_toy) -> None:  # noqa: ANN001
    images, labels, subjects = make_toy({"FLAIR": 8, "T1": 2})
    ds = TensorSliceSet(torch.from_numpy(images), labels, subjects)
    a = split_subjects(ds, "flair", n_val=2, max_train=3)
    b = split_subjects(ds, "FLAIR", n_val=2, max_train=3)
    assert a == b and len(a.val_subjects) == 2 and len(a.train_subjects) == 3
    assert not set(a.val_subjects) & set(a.train_subjects)
    assert {ds.info(i).subject for i in a.train_indices} == set(a.train_subjects)
    assert all(ds.info(i).contrast == "FLAIR" for i in a.val_indices + a.train_indices)
    with pytest.raises(ValueError, match="not in the training set"):
        split_subjects(ds, "T2", n_val=1)
    with pytest.raises(ValueError, match="cannot hold out"):
        split_subjects(ds, "T1", n_val=2)


def test_finetune_adds_slot_and_keeps_old_contrasts_close(make_toy, tmp_path: Path) -> None:  # noqa: ANN001
    pre_images, pre_labels, pre_subjects = make_toy({"T1": 2, "T2": 2}, seed=1)
    pre = TensorSliceSet(torch.from_numpy(pre_images), pre_labels, pre_subjects)
    model = build_denoiser("tiny", ["T1", "T2"], seed=2)
    train(model, pre, config=_config(10), out_dir=tmp_path / "pre")
    model.eval()
    x = pre.images[:4]
    probe = {c: model(x, 0.5, c).detach() for c in ("T1", "T2")}
    model.add_contrast_slot("FLAIR")
    for c in ("T1", "T2"):
        assert torch.equal(model(x, 0.5, c), probe[c])  # exactly equal before any update
    ft_images, ft_labels, ft_subjects = make_toy({"FLAIR": 3}, seed=2)
    target = TensorSliceSet(torch.from_numpy(ft_images), ft_labels, ft_subjects)
    label_before = model.net.label_net[0].weight.detach().clone()
    cfg = _config(5, mode="finetune", lr=LRSchedule(base_lr=1e-5, total_steps=5), val_every=5)
    train(model, target, config=cfg, out_dir=tmp_path / "ft", val_set=target)
    model.eval()
    assert not torch.equal(model.net.label_net[0].weight, label_before)  # embedding net is trained
    for c in ("T1", "T2"):
        # 5 Adam steps at 1e-5 move every weight by <= 5e-5; on this barely trained tiny net (whose
        # zero-initialised convs are still small) that is a few percent of the output.
        change = float((model(x, 0.5, c).detach() - probe[c]).norm() / probe[c].norm())
        assert 0 < change < 0.1, (c, change)
    card = json.loads((tmp_path / "ft" / "best" / "card.json").read_text())
    assert card["contrast_slots"] == ["T1", "T2", "FLAIR"]
    assert (
        card["training"]["lr_schedule"]["base_lr"] == 1e-5 and card["training"]["effective_lr_last"] == 1e-5
    )
    assert set(card["validation"]["best"]) >= {"psnr@0.1", "psnr@0.5", "psnr@1", "psnr_mean"}


def test_validate_is_reproducible(toy_set: TensorSliceSet) -> None:
    model = build_denoiser("tiny", ["T1", "T2"], seed=4)
    a = validate(model, toy_set, max_slices=6)
    b = validate(model, toy_set, max_slices=6)
    assert a == b and a["slices"] == 6
    # an untrained denoiser is c_skip (x + sigma n): check sigma 0.1 against that by hand
    x = toy_set.images[0:1]
    noise = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(mix_seed(VAL_SEED, 0, 0)))
    d = (0.25 / (0.25 + 0.01)) * (x + 0.1 * noise)
    peak2 = float(torch.view_as_complex(x[0].permute(1, 2, 0).contiguous()).abs().max()) ** 2
    psnr0 = 10 * math.log10(peak2 / float((d - x).square().sum(dim=1).mean()))
    one = validate(model, TensorSliceSet(x, ["T1"], ["s"]), sigmas=(0.1,))
    assert one["psnr@0.1"] == pytest.approx(psnr0, abs=0.01)


def test_npy_slice_set_format(toy_dir: Path, tmp_path: Path) -> None:
    ds = open_training_set(toy_dir)
    assert isinstance(ds, SliceSet) and len(ds) == 18 * 4
    x, contrast, subject = ds[5]
    assert x.shape == (2, 16, 16) and x.dtype == torch.float32
    assert (contrast, subject) == tuple(ds.info(5)) == ("T1", "T1-s01")
    raw = np.load(toy_dir / "slices.npy")[5]
    np.testing.assert_array_equal(x.numpy(), np.stack([raw.real, raw.imag]))
    blob = pickle.dumps(ds)  # what a data-loader worker receives: the path, not the array
    assert len(blob) < 20_000
    assert torch.equal(pickle.loads(blob)[5][0], x)
    bad = tmp_path / "bad"
    write_npy_slice_set(bad, np.zeros((2, 4, 4), np.complex64), ["T1", "T1"], ["a", "b"])
    (bad / "index.json").write_text(json.dumps({"slices": [{"contrast": "T1"}] * 2}))
    with pytest.raises(ValueError, match="'contrast' and 'subject'"):
        open_training_set(bad)
    (bad / "index.json").write_text(json.dumps({"slices": [{"contrast": "T1", "subject": "a"}]}))
    with pytest.raises(ValueError, match="1 entries for 2 slices"):
        open_training_set(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_training_set(tmp_path / "nowhere")
