"""Posterior samplers (recon.dps): convergence with perfect priors, residual decrease, determinism."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from recon_server.dpm.unet import build_denoiser
from recon_server.recon import dps
from recon_server.recon.masks import equispaced_mask, mask_2d
from recon_server.recon.sense import SenseOperator

# Samplers on tiny images: one thread is faster and gives the same numbers on every machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def problem(case_factory: Callable) -> tuple[Tensor, SenseOperator, Tensor]:
    """Noiseless 32x32, 4 coils, 2 slices, R = 2 equispaced with an 8-line centre."""
    case = case_factory(32, 4, 2, seed=3)
    mask = torch.from_numpy(mask_2d(equispaced_mask(32, 2, center_fraction=0.25, offset=0), 32))
    op = SenseOperator(case.maps, mask)
    truth = case.image / float(np.percentile(case.image.abs().numpy(), 99))
    return truth, op, op.forward(truth)


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_denoiser("tiny", ["T1", "FLAIR"], seed=1).eval().requires_grad_(False)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().norm() / b.abs().norm())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_oracle_denoiser_gives_the_truth(problem: tuple) -> None:
    truth, op, y = problem

    def oracle(x: Tensor, s: Tensor) -> Tensor:
        return dps.to_channels(truth).clone()

    for res in (
        dps.dps_sample(oracle, op, y, steps=20, zeta=1.0, generator=_gen(0)),
        dps.dds_sample(oracle, op, y, steps=10, generator=_gen(0)),
    ):
        assert _rel(res.image, truth) < 1e-5


def test_exact_gaussian_prior_converges_on_noiseless_full_data(problem: tuple) -> None:
    # Fully sampled, noiseless: the posterior is a point mass at the truth whatever the prior.
    truth, op, _ = problem
    full = SenseOperator(op.maps, torch.ones(32, 32))
    y = full.forward(truth)
    c = 0.5  # prior N(0, c^2 I): D(x; s) = c^2 / (c^2 + s^2) x exactly

    def gauss(x: Tensor, s: Tensor) -> Tensor:
        return (c**2 / (c**2 + s**2))[:, None, None, None] * x

    start = _rel(full.adjoint(y) * 0, truth)
    res = dps.dps_sample(gauss, full, y, steps=60, zeta=1.0, generator=_gen(0))
    assert start == pytest.approx(1.0)
    assert _rel(res.image, truth) < 1e-4
    assert float(res.residual.max()) < 1e-4
    res = dps.dds_sample(gauss, full, y, steps=20, generator=_gen(0))
    assert _rel(res.image, truth) < 1e-3


def test_guard_keeps_the_step_stable_as_the_residual_vanishes(problem: tuple) -> None:
    truth, op, _ = problem
    full = SenseOperator(op.maps, torch.ones(32, 32))
    y = full.forward(truth)

    def gauss(x: Tensor, s: Tensor) -> Tensor:
        return (0.25 / (0.25 + s**2))[:, None, None, None] * x

    guarded = dps.dps_sample(gauss, full, y, steps=60, zeta=1.0, generator=_gen(0))
    unguarded = dps.dps_sample(gauss, full, y, steps=60, zeta=1.0, guard=1e-6, generator=_gen(0))
    # Without the floor the normalised step keeps its size ~zeta while ||r|| -> 0: it oscillates.
    assert float(guarded.residual.max()) < 1e-4
    assert float(unguarded.residual.min()) > 10 * float(guarded.residual.max())


def test_dps_step_decreases_the_data_residual(problem: tuple, tiny: torch.nn.Module) -> None:
    truth, op, y = problem

    def den(x: Tensor, s: Tensor) -> Tensor:
        return tiny(x, s, "FLAIR")

    x = dps.to_channels(truth) + 0.1 * torch.randn((2, 2, 32, 32), generator=_gen(5))
    _, x0, r_before, _ = dps.dps_step(den, op, y, x, 0.1, 0.08, zeta=0.0)
    with_dc, _, _, _ = dps.dps_step(den, op, y, x, 0.1, 0.08, zeta=2.0)
    without, _, _, _ = dps.dps_step(den, op, y, x, 0.1, 0.08, zeta=0.0)
    s = torch.full((2,), 0.08)

    def resid(v: Tensor) -> Tensor:
        return dps.residual_norm(op, dps.to_complex(den(v, s)), y)

    assert bool((resid(with_dc) < resid(without)).all())
    assert bool((resid(with_dc) < dps.residual_norm(op, dps.to_complex(x0), y)).all())
    # Over a whole run the data term pulls the sample towards the data.
    r0 = dps.dps_sample(den, op, y, steps=8, zeta=0.0, generator=_gen(0)).residual
    r1 = dps.dps_sample(den, op, y, steps=8, zeta=1.0, generator=_gen(0)).residual
    assert bool((r1 < 0.7 * r0).all())


@pytest.mark.parametrize("kind", ["dps", "dds"])
def test_samplers_are_deterministic_for_a_seed(problem: tuple, tiny: torch.nn.Module, kind: str) -> None:
    _, op, y = problem

    def den(x: Tensor, s: Tensor) -> Tensor:
        return tiny(x, s, 1)

    def run(seed: int | list[int]) -> dps.SampleResult:
        gens = _gen(seed) if isinstance(seed, int) else [_gen(s) for s in seed]
        if kind == "dps":
            return dps.dps_sample(den, op, y, steps=4, zeta=1.0, generator=gens)
        return dps.dds_sample(den, op, y, steps=4, eta=1.0, generator=gens)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.image, b.image)
    assert not torch.allclose(a.image, c.image)
    # One generator per item: the items do not influence each other's noise.
    pair = run([11, 12])
    assert torch.equal(pair.image, run([11, 12]).image)
    assert not torch.allclose(pair.image[0], run([13, 12]).image[0])


@pytest.mark.parametrize("kind", ["dps", "dds"])
def test_pixels_no_coil_sees_stay_empty_with_a_support(problem: tuple, kind: str) -> None:
    # Maps zeroed on the border (as ESPIRiT's crop does): the data cannot correct those pixels,
    # so a prior that paints a texture there would keep it; with the support they come back 0.
    truth, op, _ = problem
    support = torch.zeros(truth.shape, dtype=torch.bool)
    support[:, 6:-6, 6:-6] = True
    cropped = SenseOperator(op.maps * support[:, None], op.mask)
    y = cropped.forward(truth * support)

    def texture(x: Tensor, s: Tensor) -> Tensor:  # the truth plus a pattern everywhere
        return dps.to_channels(truth).clone() + 0.3

    def sample(**kw: object) -> dps.SampleResult:
        if kind == "dps":
            return dps.dps_sample(texture, cropped, y, steps=5, zeta=1.0, generator=_gen(0), **kw)  # type: ignore[arg-type]
        return dps.dds_sample(texture, cropped, y, steps=5, generator=_gen(0), **kw)  # type: ignore[arg-type]

    free, kept = sample(), sample(support=support)
    assert float(free.image[~support].abs().max()) > 0.1  # the texture survives without a support
    assert float(kept.image[~support].abs().max()) == 0.0
    assert _rel(kept.image * support, truth * support) < _rel(free.image, truth * support)
    with pytest.raises(ValueError, match="support must be"):
        sample(support=support[:, :-1])


def test_network_evaluations_are_counted(problem: tuple) -> None:
    _, op, y = problem

    def den(x: Tensor, s: Tensor) -> Tensor:
        calls.append(x.shape[0])
        return x * 0.5

    calls: list[int] = []
    res = dps.dps_sample(den, op, y, steps=6, generator=_gen(0))
    assert res.nfe == len(calls) == 6 and res.backprops == 6
    calls.clear()
    res = dps.dps_sample(den, op, y, steps=6, solver="heun", generator=_gen(0))
    assert res.nfe == len(calls) == 11  # no second evaluation on the step to sigma = 0
    calls.clear()
    res = dps.dds_sample(den, op, y, steps=6, generator=_gen(0))
    assert res.nfe == len(calls) == 6 and res.backprops == 0
    assert res.settings["sampler"] == "dds" and res.settings["steps"] == 6


def test_bad_inputs_raise_clear_errors(problem: tuple) -> None:
    _, op, y = problem

    def den(x: Tensor, s: Tensor) -> Tensor:
        return x

    bad = y.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        dps.dps_sample(den, op, bad, steps=2)
    with pytest.raises(ValueError, match="NaN"):
        dps.dds_sample(den, op, bad, steps=2)
    with pytest.raises(ValueError, match="steps"):
        dps.dds_sample(den, op, y, steps=0)
    with pytest.raises(ValueError, match="generators"):
        dps.dds_sample(den, op, y, steps=2, generator=[_gen(0)])
    with pytest.raises(ValueError, match="solver"):
        dps.dps_sample(den, op, y, steps=2, solver="rk4")


def test_noise_calibrated_weight_removes_the_noise_the_data_carry(problem: tuple) -> None:
    # With a perfect prior (the oracle) and noisy data, the constant weight keeps the noise on the
    # sampled k-space; the weight lambda (sigma_y / s_i)^2 hands the late steps to the prior.
    truth, op, y = problem
    sigma_y = 0.05
    noisy = y + op.mask * sigma_y * torch.randn(y.shape, dtype=y.dtype, generator=_gen(4))

    def oracle(x: Tensor, s: Tensor) -> Tensor:
        return dps.to_channels(truth).clone()

    noise = torch.full((y.shape[0],), sigma_y)
    plain = dps.dds_sample(oracle, op, noisy, steps=10, gamma=1e-3, generator=_gen(0))
    calibrated = dps.dds_sample(
        oracle, op, noisy, steps=10, gamma=1e-3, noise_sigma=noise, data_weight=1.0, generator=_gen(0)
    )
    assert _rel(calibrated.image, truth) < 0.2 * _rel(plain.image, truth)
    assert calibrated.settings["data_weight"] == 1.0
    # plug-and-play (no re-noising) from a warm start: deterministic, and as good with this prior
    kw = dict(steps=6, gamma=1e-3, noise_sigma=noise, data_weight=1.0, renoise=False, sigma_max=0.3)
    warm = op.adjoint(noisy)
    pnp = dps.dds_sample(oracle, op, noisy, init=warm, generator=_gen(0), **kw)
    again = dps.dds_sample(oracle, op, noisy, init=warm, generator=_gen(1), **kw)
    assert torch.equal(pnp.image, again.image) and pnp.settings["renoise"] is False
    assert _rel(pnp.image, truth) < 0.2 * _rel(plain.image, truth)
    with pytest.raises(ValueError, match="noise_sigma of shape"):
        dps.dds_sample(oracle, op, noisy, steps=2, data_weight=1.0, generator=_gen(0))
    with pytest.raises(ValueError, match="data_weight >= 0"):
        dps.dds_sample(oracle, op, noisy, steps=2, data_weight=-1.0, noise_sigma=noise, generator=_gen(0))
