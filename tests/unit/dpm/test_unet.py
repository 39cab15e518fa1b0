"""The contrast-conditioned U-Net: sizes, shapes, labels, slot growth."""

from __future__ import annotations

import pytest
import torch

from recon_server.dpm.architecture import MODEL_SIZES, model_config
from recon_server.dpm.unet import EDMDenoiser, build_denoiser, count_parameters

SLOTS = ["T1", "T2", "T1POST"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def nontrivial(model: EDMDenoiser, seed: int = 9) -> EDMDenoiser:
    """Replace the near-zero initialisation by random weights so outputs depend on everything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15, generator=gen)
    return model


def _x(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 2, h, w, generator=torch.Generator().manual_seed(seed))


def test_named_sizes_parameter_counts() -> None:
    counts = {}
    for size in MODEL_SIZES:
        with torch.device("meta"):  # the paper size (113M) without allocating it
            counts[size] = count_parameters(EDMDenoiser(model_config(size, num_slots=3), SLOTS))
    assert 50_000 <= counts["tiny"] <= 200_000
    assert 2_000_000 <= counts["demo"] <= 15_000_000  # float32 file well under 60 MB
    assert counts["demo"] * 4 < 60 * 2**20
    assert 90_000_000 <= counts["paper"] <= 120_000_000
    assert counts["cpu"] * 4 < 4 * 2**20  # the CPU stand-in of the shipped model: a few MB
    assert counts == {
        "tiny": 108_266,
        "cpu": 491_906,
        "cpu-res": 1_118_912,
        "tiny-res": 21_096,
        "demo": 7_342_306,
        "paper": 113_120_770,
    }  # docs/training.md


@pytest.mark.parametrize("size", ["tiny", "tiny-res"])
@pytest.mark.parametrize("shape", [(16, 16), (18, 22), (17, 9), (2, 6)])
def test_any_matrix_size_round_trips_shape(shape: tuple[int, int], size: str) -> None:
    model = build_denoiser(size, SLOTS)
    out = model(_x(2, *shape), 0.5, "T1")
    assert out.shape == (2, 2, *shape)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", ["tiny", "tiny-res"])
def test_padding_does_not_leak_between_batch_items_and_crop_is_aligned(size: str) -> None:
    model = nontrivial(build_denoiser(size, SLOTS, seed=3)).eval()
    x = _x(3, 18, 14)
    full = model(x, torch.tensor([0.2, 1.0, 3.0]), [0, 1, 2])
    single = model(x[1:2], 1.0, 1)
    atol = 1e-6 * max(1.0, float(single.detach().abs().max()))  # random unnormalised weights: large outputs
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("size", ["tiny", "tiny-res"])
def test_label_forms_and_sigma_forms_agree(size: str) -> None:
    model = nontrivial(build_denoiser(size, SLOTS, seed=1))
    x = _x(2, 16, 16)
    a = model(x, 0.7, "t2")
    b = model(x, torch.tensor(0.7), 1)
    c = model(x, torch.tensor([0.7, 0.7]), torch.tensor([1, 1]))
    d = model(x, 0.7, torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    e = model(x, torch.full((2,), 0.7, dtype=torch.float64), ["T2", "T2"])
    for other in (b, c, d, e):
        torch.testing.assert_close(a, other, rtol=0, atol=0)
    assert rel_err(a, model(x, 0.7, "T1")) > 1e-3  # the contrast embedding matters


@pytest.mark.parametrize("size", ["tiny", "tiny-res"])
def test_per_sample_sigma_is_used(size: str) -> None:
    model = nontrivial(build_denoiser(size, SLOTS))
    x = _x(1, 16, 16).expand(2, -1, -1, -1)
    out = model(x, torch.tensor([0.1, 5.0]), "T1").detach()
    atol = 1e-6 * max(1.0, float(out.abs().max()))  # random unnormalised weights: large outputs
    torch.testing.assert_close(out[0:1], model(x[:1], 0.1, "T1").detach(), rtol=1e-5, atol=atol)
    torch.testing.assert_close(out[1:2], model(x[:1], 5.0, "T1").detach(), rtol=1e-5, atol=atol)


def test_bad_inputs_give_clear_errors() -> None:
    model = build_denoiser("tiny", SLOTS)
    with pytest.raises(ValueError, match=r"'FLAIR' is not a slot.*\['T1', 'T2', 'T1POST'\]"):
        model.contrast_index("FLAIR")
    with pytest.raises(ValueError, match="not a slot"):
        model(_x(1, 16, 16), 1.0, "FLAIR")
    with pytest.raises(ValueError, match="out of range"):
        model(_x(1, 16, 16), 1.0, 3)
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        model(torch.zeros(1, 1, 16, 16), 1.0, 0)
    with pytest.raises(ValueError, match="sigma"):
        model(_x(2, 16, 16), torch.tensor([1.0, 2.0, 3.0]), 0)
    with pytest.raises(ValueError, match="duplicate"):
        build_denoiser("tiny", ["T1", "t1"])
    with pytest.raises(ValueError, match="unknown model size"):
        build_denoiser("huge", SLOTS)


@pytest.mark.parametrize("size", ["tiny", "tiny-res"])
def test_initialisation_is_deterministic_in_the_seed(size: str) -> None:
    a, b, c = (
        build_denoiser(size, SLOTS, seed=5),
        build_denoiser(size, SLOTS, seed=5),
        build_denoiser(size, SLOTS, seed=6),
    )
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("size", ["tiny", "tiny-res"])
@pytest.mark.parametrize("init", ["mean", "zeros"])
def test_adding_a_slot_keeps_old_outputs_exactly(init: str, size: str) -> None:
    model = nontrivial(build_denoiser(size, SLOTS, seed=2))
    x = _x(3, 16, 16)
    sigma = torch.tensor([0.05, 0.5, 4.0])
    before = {c: model(x, sigma, c) for c in SLOTS}
    gain = model.config.label_gain
    index = model.add_contrast_slot("flair", init=init)
    assert index == 3 and model.contrast_slots == ("T1", "T2", "T1POST", "FLAIR")
    assert model.config.num_slots == 4 and model.config.label_gain == gain
    for c in SLOTS:
        assert torch.equal(model(x, sigma, c), before[c]), c
    first = model.net.label_net[0]
    assert isinstance(first, torch.nn.Linear) and first.weight.shape[1] == 4
    expected_col = first.weight[:, :3].mean(dim=1) if init == "mean" else torch.zeros(first.out_features)
    torch.testing.assert_close(first.weight[:, 3], expected_col)
    new = model(x, sigma, "FLAIR")
    assert torch.isfinite(new).all() and min(rel_err(new, before[c]) for c in SLOTS) > 1e-3
    new.square().mean().backward()  # the new column is trainable
    assert first.weight.grad is not None and float(first.weight.grad[:, 3].abs().sum()) > 0
    with pytest.raises(ValueError, match="already has slot"):
        model.add_contrast_slot("T2")


def test_resunet_is_bias_free_and_has_no_normalisation() -> None:
    model = build_denoiser("cpu-res", SLOTS)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    assert convs and all(m.bias is None for m in convs)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    with pytest.raises(ValueError, match="no attention"):
        model_config("tiny", num_slots=3).__class__(backbone="resunet", attn_levels=(1,))
    with pytest.raises(ValueError, match="backbone must be"):
        model_config("tiny", num_slots=3).__class__(backbone="transformer")


def test_resunet_in_bf16_channels_last_matches_fp32() -> None:
    model = nontrivial(build_denoiser("tiny-res", SLOTS, seed=4), seed=4).eval()
    for p in model.parameters():
        p.data.mul_(0.3)  # keep the random network's activations O(1)
    x = _x(2, 32, 32)
    ref = model(x, 0.3, "T2")
    fast = model.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x.contiguous(memory_format=torch.channels_last), 0.3, "T2")
    assert out.dtype == torch.float32  # the c_skip x path and the output stay fp32
    assert rel_err(out, ref) < 0.02
