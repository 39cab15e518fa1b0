"""CPU training of the prior: head-biased patches, augmentation, the precision probe, truth slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recon_server.data.acquire import SimulationConfig, render_subject
from recon_server.dpm.checkpoint import read_tensors, read_training_meta
from recon_server.dpm.precision import CpuPrecision, probe_cpu_precision
from recon_server.dpm.unet import build_denoiser
from recon_server.training.augment import Augmentation, augment, head_patches
from recon_server.training.config import TrainConfig
from recon_server.training.schedule import LRSchedule
from recon_server.training.train import train
from recon_server.training.trainset import NpySliceSet, TensorSliceSet
from recon_server.training.truthset import normalised_truth, write_truth_set

from .conftest import toy_images


def _corner_image(b: int, size: int = 32) -> torch.Tensor:
    x = torch.zeros(b, 2, size, size)
    x[:, 0, :10, :10] = 1.0  # signal only in one corner: most random patches would be empty
    return x


def test_head_patches_prefer_signal_and_are_fixed_by_the_step() -> None:
    x = _corner_image(64)
    patches = head_patches(x, step=3, crop=8, seed=1)
    assert patches.shape == (64, 2, 8, 8)
    with_signal = float((patches.abs().sum(dim=(1, 2, 3)) > 0).float().mean())
    plain = torch.stack(
        [x[i, :, t : t + 8, s : s + 8] for i, (t, s) in enumerate(torch.randint(0, 25, (64, 2)))]
    )
    assert with_signal > 0.3 > float((plain.abs().sum(dim=(1, 2, 3)) > 0).float().mean())
    assert torch.equal(patches, head_patches(x, step=3, crop=8, seed=1))
    assert not torch.equal(patches, head_patches(x, step=4, crop=8, seed=1))
    # a data-parallel rank holding rows 16..31 of the global batch gets the same patches
    assert torch.equal(patches[16:32], head_patches(x[16:32], step=3, crop=8, seed=1, rows=(16, 64)))
    with pytest.raises(ValueError, match="crop 40"):
        head_patches(x, step=0, crop=40, seed=1)


def test_augmentation_is_a_plausible_image_change_fixed_by_the_step() -> None:
    images, _, _ = toy_images({"T1": 2}, size=24)
    x = torch.from_numpy(np.stack([images.real, images.imag], axis=1)).float()
    a = augment(x, step=5, seed=2, settings=Augmentation())
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert torch.equal(a, augment(x, step=5, seed=2, settings=Augmentation()))
    assert torch.equal(a[3:6], augment(x[3:6], step=5, seed=2, settings=Augmentation(), rows=(3, 8)))
    assert not torch.allclose(a, x)
    mag_in, mag_out = x.square().sum(1).sqrt(), a.square().sum(1).sqrt()
    support_in = (mag_in > 0).sum(dim=(1, 2))
    assert torch.equal(support_in, (mag_out > 0).sum(dim=(1, 2)))  # same head, moved at most
    ratio = mag_out.amax(dim=(1, 2)) / mag_in.amax(dim=(1, 2))
    assert bool(((ratio > 0.5) & (ratio < 2.0)).all())  # gain and gamma stay within a scan's spread
    assert torch.equal(augment(x, step=5, seed=2, settings=Augmentation(enabled=False)), x)


def test_precision_probe_measures_every_setting() -> None:
    chosen = probe_cpu_precision(build_denoiser("tiny-res", ["T1"]), batch=2, crop=16, repeats=1)
    assert chosen.measured is not None and set(chosen.measured) == {"fp32", "bf16", "fp32-cl", "bf16-cl"}
    assert chosen.measured[chosen.name] == max(chosen.measured.values()) > 0
    assert CpuPrecision.named("bf16-cl") == CpuPrecision(bf16=True, channels_last=True)
    with pytest.raises(ValueError, match="CPU precision"):
        CpuPrecision.named("fp16")


def _tensors(run: Path, stem: str) -> dict[str, torch.Tensor]:
    meta = read_training_meta(run / "train_state")
    return read_tensors(run / "train_state", {f"{stem}.safetensors": meta["files"][f"{stem}.safetensors"]})


def test_cpu_training_with_patches_augmentation_and_bf16_resumes_identically(tmp_path: Path) -> None:
    images, labels, subjects = toy_images({"T1": 3, "T2": 3}, size=32)
    ds = TensorSliceSet(torch.from_numpy(images), labels, subjects)

    def config(**kw: object) -> TrainConfig:
        base: dict = dict(
            mode="pretrain", total_steps=6, global_batch=4, lr=LRSchedule(base_lr=1e-3, total_steps=6),
            ema_halflife_images=100.0, log_every=2, val_every=0, ckpt_every=2, progress=False, crop=16,
            large_crop=32, large_every=3, augment=True, cpu_precision="bf16-cl",
        )  # fmt: skip
        return TrainConfig(**{**base, **kw})

    train(build_denoiser("tiny-res", ["T1", "T2"], seed=1), ds, config=config(), out_dir=tmp_path / "a")
    train(
        build_denoiser("tiny-res", ["T1", "T2"], seed=1),
        ds,
        config=config(stop_at_step=4),
        out_dir=tmp_path / "b",
    )
    # the resumed run keeps its saved arithmetic even when asked for another
    resumed = build_denoiser("tiny-res", ["T1", "T2"], seed=7)
    train(resumed, ds, config=config(cpu_precision="fp32"), out_dir=tmp_path / "b", resume=True)
    for stem in ("model", "ema", "optimizer"):
        a, b = _tensors(tmp_path / "a", stem), _tensors(tmp_path / "b", stem)
        assert all(torch.equal(a[k], b[k]) for k in a), stem
    meta = read_training_meta(tmp_path / "b" / "train_state")
    assert meta["cpu_precision"]["name"] == "bf16-cl"
    with pytest.raises(ValueError, match="cannot resume: augment"):
        train(resumed, ds, config=config(augment=False), out_dir=tmp_path / "b", resume=True)


def test_truth_slices_are_noiseless_normalised_and_reproducible(tmp_path: Path) -> None:
    config = SimulationConfig(
        contrast="FLAIR", matrix=64, slices=2, coils=1, lesions=True, readout_oversampling=1
    )
    out = write_truth_set(tmp_path / "t", config, seed=3, subjects=1, first_subject=2)
    ds = NpySliceSet(out)
    assert len(ds) == 2 and ds.info(0) == ("FLAIR", "FLAIR-3/sub-002")
    truth = render_subject(config, seed=3, index=2).truth
    np.testing.assert_allclose(ds.data, normalised_truth(truth), rtol=1e-6)
    # the scale is the project's rule: the low-resolution image's 99th percentile becomes 1
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(ds.data, axes=(-2, -1))), axes=(-2, -1))
    low = np.zeros_like(k)
    rows = slice(32 - 3, 32 + 2)  # centre_acs(64, 0.08): 5 rows around the centre
    low[:, rows] = k[:, rows]
    image = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(low, axes=(-2, -1))), axes=(-2, -1))
    np.testing.assert_allclose(np.quantile(np.abs(image), 0.99, axis=(1, 2)), 1.0, rtol=0.05)
