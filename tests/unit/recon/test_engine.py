"""Volume engine (recon.engine): batching independence, seeds, scale rule, SD maps, bad volumes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from recon_server.dpm.unet import build_denoiser
from recon_server.recon import engine
from recon_server.recon.engine import SamplerSpec, reconstruct_volume, volume_scale
from recon_server.recon.masks import equispaced_mask, mask_2d
from recon_server.recon.scale import centre_acs, slice_scale

# Samplers on tiny images: one thread is faster and gives the same numbers on every machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def volume(case_factory: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 slices, 32x32, 4 coils, 1% noise, R = 2 with a 6-line centre; k-space in odd units."""
    case = case_factory(32, 4, 3, noise=0.01, seed=5)
    mask = torch.from_numpy(mask_2d(equispaced_mask(32, 2, center_fraction=0.2, offset=0), 32))
    return case.full * mask * 37.0, case.maps, mask


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_denoiser("tiny", ["T1", "FLAIR"], seed=2).eval().requires_grad_(False)


DDS = SamplerSpec(kind="dds", steps=4, eta=1.0)
DPS = SamplerSpec(kind="dps", steps=3, zeta=1.0)


@pytest.mark.parametrize("spec", [DDS, DPS], ids=["dds", "dps"])
def test_results_do_not_depend_on_the_batch_size(
    volume: tuple, tiny: torch.nn.Module, spec: SamplerSpec
) -> None:
    k, maps, mask = volume
    one = reconstruct_volume(tiny, "FLAIR", k, maps, mask, spec, seed=4, batch_size=1)
    three = reconstruct_volume(tiny, "FLAIR", k, maps, mask, spec, seed=4, batch_size=3)
    two = reconstruct_volume(tiny, "FLAIR", k, maps, mask, spec, seed=4, batch_size=2)
    assert (one.batch_size, two.batch_size, three.batch_size) == (1, 2, 3)
    scale = float(one.image.abs().max())
    torch.testing.assert_close(one.image, three.image, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(one.image, two.image, rtol=0, atol=1e-4 * scale)
    again = reconstruct_volume(tiny, "FLAIR", k, maps, mask, spec, seed=4, batch_size=2)
    assert torch.equal(again.image, two.image)
    other = reconstruct_volume(tiny, "FLAIR", k, maps, mask, spec, seed=5, batch_size=2)
    assert not torch.allclose(other.image, two.image)
    assert one.nfe == spec.steps and one.settings["nfe_per_slice"] == spec.steps


def test_output_is_in_data_units(volume: tuple, tiny: torch.nn.Module) -> None:
    # The sampler works on y / scale; the image comes back multiplied by the scale: a data-consistent
    # DDS result matches the measured k-space in its own units.
    k, maps, mask = volume
    res = reconstruct_volume(
        tiny, "FLAIR", k, maps, mask, SamplerSpec(kind="dds", steps=3, gamma=1e-3, cg_iters=20)
    )
    from recon_server.recon.sense import SenseOperator

    op = SenseOperator(maps, mask)
    rel = (op.forward(res.image) - k).norm() / k.norm()
    assert float(rel) < 0.05
    assert float(res.settings["residual_rel_mean"]) < 0.05


def test_scale_is_the_training_rule(volume: tuple) -> None:
    k, maps, mask = volume
    t0, t1 = centre_acs(32, 0.08)  # 3 rows, inside the 6-row ACS block
    expected = slice_scale(k[:, :, t0:t1], maps, acs=(t0, t1))
    torch.testing.assert_close(engine.volume_scale(k, maps, mask), expected)
    torch.testing.assert_close(engine.volume_scale(2 * k, maps, mask), 2 * expected)


def test_several_samples_give_mean_and_sd(volume: tuple, tiny: torch.nn.Module) -> None:
    k, maps, mask = volume
    res = reconstruct_volume(tiny, "FLAIR", k[:2], maps[:2], mask, DDS, samples=3, seed=1, batch_size=4)
    single = reconstruct_volume(tiny, "FLAIR", k[:2], maps[:2], mask, DDS, samples=1, seed=1)
    assert res.std is not None and single.std is None
    assert res.std.shape == (2, 32, 32) and bool((res.std >= 0).all()) and float(res.std.max()) > 0
    assert res.settings["samples"] == 3 and res.settings["nfe_per_slice"] == 3 * DDS.steps
    # Sample 0 of each slice uses the same generators as the single run.
    assert not torch.allclose(res.image, single.image)


def test_one_slice_works_and_bad_volumes_are_refused(volume: tuple, tiny: torch.nn.Module) -> None:
    k, maps, mask = volume
    one = reconstruct_volume(tiny, "FLAIR", k[:1], maps[:1], mask, DDS)
    assert one.image.shape == (1, 32, 32) and bool(torch.isfinite(one.image.abs()).all())
    with pytest.raises(ValueError, match="no slices"):
        reconstruct_volume(tiny, "FLAIR", k[:0], maps[:0], mask, DDS)
    # No fully sampled centre (a separate reference calibrated the maps): the scale comes from the
    # measured half of the central block, so the result is on the scale of the full-ACS one.
    no_acs = torch.from_numpy(mask_2d(np.arange(32) % 2 == 0, 32))
    with_acs = volume_scale(k * torch.as_tensor(mask), maps, mask)
    without = volume_scale(k * no_acs, maps, no_acs)
    assert torch.allclose(without, with_acs, rtol=0.5)
    rows = np.arange(32)
    nothing_central = torch.from_numpy(mask_2d((rows % 2 == 0) & (np.abs(rows - 16) > 8), 32))
    with pytest.raises(ValueError, match="no phase-encode line near the k-space centre"):
        reconstruct_volume(tiny, "FLAIR", k * nothing_central, maps, nothing_central, DDS)
    bad = k.clone()
    bad[1, 2, 3, 4] = complex("nan")
    with pytest.raises(ValueError, match="NaN"):
        reconstruct_volume(tiny, "FLAIR", bad, maps, mask, DDS)
    with pytest.raises(ValueError, match="not a slot.*T1.*FLAIR"):
        reconstruct_volume(tiny, "PD", k, maps, mask, DDS)
    with pytest.raises(ValueError, match="contrast is unknown"):
        reconstruct_volume(tiny, "", k, maps, mask, DDS)
    with pytest.raises(ValueError, match="sampler kind"):
        SamplerSpec(kind="ddpm", steps=3)


def test_warm_start_runs_only_the_end_of_the_schedule(volume: tuple, tiny: torch.nn.Module) -> None:
    k, maps, mask = volume
    warm = SamplerSpec(kind="dds", steps=3, warm_sigma=0.5)
    res = reconstruct_volume(tiny, "FLAIR", k, maps, mask, warm)
    assert res.nfe == 3 and res.settings["warm_start"] == "cg-sense" and res.settings["warm_sigma"] == 0.5
    with pytest.raises(ValueError, match="warm_sigma"):
        SamplerSpec(kind="dds", steps=3, warm_sigma=50.0)
    l1 = SamplerSpec(kind="dds", steps=2, warm_sigma=0.2, warm_start="l1-wavelet", data_weight=1.0, eta=0.0)
    res = reconstruct_volume(tiny, "FLAIR", k, maps, mask, l1)  # the noise level estimated from the data
    assert res.settings["warm_start"] == "l1-wavelet" and res.settings["data_weight"] == 1.0
    assert torch.isfinite(res.image).all()
    with pytest.raises(ValueError, match="warm_start must be one of"):
        SamplerSpec(kind="dds", steps=3, warm_start="zero-filled")


def test_cpu_precision_choices_agree_with_fp32(volume: tuple) -> None:
    k, maps, mask = volume
    model = build_denoiser("tiny-res", ["T1", "FLAIR"], seed=2).eval().requires_grad_(False)
    spec = SamplerSpec(kind="dds", steps=3, eta=0.0)
    ref = reconstruct_volume(model, "FLAIR", k, maps, mask, spec)
    assert ref.settings["amp_bf16"] is False
    for setting in ("bf16-cl", "auto"):
        out = reconstruct_volume(model, "FLAIR", k, maps, mask, spec, cpu_precision=setting)
        assert float((out.image - ref.image).abs().max() / ref.image.abs().max()) < 0.02
    assert reconstruct_volume(model, "FLAIR", k, maps, mask, spec, cpu_precision="bf16").settings["amp_bf16"]


def test_batch_size_from_free_memory_and_cpu_fallback() -> None:
    assert engine.choose_batch_size(10_000, 1_000, items=32) == 8  # 0.8 * 10000 / 1000
    assert engine.choose_batch_size(10_000, 1_000, items=5) == 5
    assert engine.choose_batch_size(100, 1_000, items=5) == 1
    if not torch.cuda.is_available():
        assert engine.select_device("cuda").type == "cpu"
    assert engine.select_device("cpu").type == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_matches_cpu(volume: tuple, tiny: torch.nn.Module) -> None:
    k, maps, mask = volume
    spec = SamplerSpec(kind="dds", steps=4, eta=0.0)
    cpu = reconstruct_volume(tiny, "FLAIR", k, maps, mask, spec, device="cpu")
    gpu = reconstruct_volume(tiny.to("cuda"), "FLAIR", k, maps, mask, spec, device="cuda")
    tiny.to("cpu")
    assert gpu.amp and gpu.batch_size >= 1
    rel = (gpu.image - cpu.image).norm() / cpu.image.norm()
    assert float(rel) < 0.02
