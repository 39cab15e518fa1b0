"""Prior sampler: exact on a Gaussian prior; PNG writer readable by Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recon_server.dpm.edm import edm_sigmas
from recon_server.dpm.sample import edm_sample, sample_prior
from recon_server.dpm.unet import build_denoiser
from recon_server.research.preview import magnitude_grid, write_png

SD = 0.5


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact denoiser E[x0 | x] for data x0 ~ N(0, SD^2 I)."""
    s2 = sigma.reshape(-1, 1, 1, 1) ** 2
    return SD**2 / (SD**2 + s2) * x


def test_heun_solves_the_gaussian_probability_flow_ode() -> None:
    # For a N(0, SD^2) prior the ODE solution is x(s) = x(s0) sqrt(s^2 + SD^2) / sqrt(s0^2 + SD^2).
    noise = torch.randn(256, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = edm_sigmas(32)
    exact = noise * float(sigmas[0]) * SD / np.sqrt(float(sigmas[0]) ** 2 + SD**2)
    heun = edm_sample(gaussian_denoiser, noise, sigmas=sigmas, solver="heun")
    euler = edm_sample(gaussian_denoiser, noise, sigmas=sigmas, solver="euler")
    err_heun = float((heun - exact).norm() / exact.norm())
    err_euler = float((euler - exact).norm() / exact.norm())
    heun64 = edm_sample(gaussian_denoiser, noise, sigmas=edm_sigmas(64), solver="heun")
    err_heun64 = float((heun64 - exact).norm() / exact.norm())
    assert err_heun < 1e-2, err_heun
    assert err_heun < err_euler / 3, (err_heun, err_euler)
    assert err_heun64 < err_heun / 3, (err_heun64, err_heun)  # second order: ~4x per doubling
    assert float(heun.std()) == pytest.approx(SD, rel=0.02)
    with pytest.raises(ValueError, match="ending with 0"):
        edm_sample(gaussian_denoiser, noise, sigmas=edm_sigmas(4, append_zero=False))


def test_sample_prior_shapes_determinism_and_slot_check() -> None:
    model = build_denoiser("tiny", ["T1", "FLAIR"], seed=0).eval()
    a = sample_prior(model, "FLAIR", n=3, size=(12, 10), steps=3, seed=5, batch=2)
    b = sample_prior(model, "flair", n=3, size=(12, 10), steps=3, seed=5, batch=3)
    assert a.shape == (3, 12, 10) and a.dtype == torch.complex64
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(torch.view_as_real(a)).all()
    with pytest.raises(ValueError, match="not a slot"):
        sample_prior(model, "T2", n=1, size=(8, 8), steps=2)


def test_png_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(37, 53), dtype=np.uint8)
    path = write_png(tmp_path / "sub" / "x.png", img)
    with Image.open(path) as im:
        assert im.size == (53, 37)
        np.testing.assert_array_equal(np.asarray(im.convert("L")), img)
    grid = magnitude_grid(rng.standard_normal((5, 8, 6)) + 1j, pad=2)
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (6 + 2) + 2) and grid.dtype == np.uint8
    assert grid.max() == 255 and grid[0].max() == 0  # tiles scaled, border black
