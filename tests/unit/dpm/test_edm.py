"""EDM formulas: preconditioning, loss weight, noise-level schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recon_server.dpm.architecture import UNetConfig
from recon_server.dpm.edm import EDMLoss, edm_sigmas, loss_weight, precond_coefficients
from recon_server.dpm.unet import EDMDenoiser

SD = 0.5


def test_precond_coefficients_match_karras_table_1() -> None:
    for s in (0.002, 0.1, 0.5, 1.0, 10.0, 80.0):
        c_skip, c_out, c_in, c_noise = precond_coefficients(torch.tensor([s], dtype=torch.float64))
        assert float(c_skip) == pytest.approx(SD**2 / (s**2 + SD**2), rel=1e-12)
        assert float(c_out) == pytest.approx(s * SD / math.sqrt(s**2 + SD**2), rel=1e-12)
        assert float(c_in) == pytest.approx(1 / math.sqrt(s**2 + SD**2), rel=1e-12)
        assert float(c_noise) == pytest.approx(math.log(s) / 4, rel=1e-12)
    # the effective training target has unit variance: c_skip^2 sd^2 ... identity of EDM eq. (7)
    s = torch.tensor([0.3])
    c_skip, c_out, _, _ = precond_coefficients(s)
    assert float(loss_weight(s)) == pytest.approx(float(1 / c_out**2), rel=1e-6)
    with pytest.raises(ValueError, match="positive"):
        precond_coefficients(torch.tensor([0.0]))


class RecordingBackbone(torch.nn.Module):
    """Stands in for the U-Net: records its inputs and returns ``2 x_in + c_noise``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        self.seen = {"x": x.clone(), "c_noise": c_noise.clone(), "onehot": onehot.clone()}
        return 2 * x + c_noise[:, None, None, None]


def test_wrapper_applies_edm_preconditioning() -> None:
    cfg = UNetConfig(base_channels=8, channel_mults=(1,), num_blocks=1, attn_levels=(), num_slots=2)
    model = EDMDenoiser(cfg, ["T1", "T2"])
    backbone = RecordingBackbone(cfg)
    model.net = backbone  # type: ignore[assignment]
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.05, 0.7, 12.0])
    out = model(x, sigma, ["T2", "T1", "T2"])
    s = sigma.double().reshape(-1, 1, 1, 1)
    c_skip = SD**2 / (s**2 + SD**2)
    c_out = s * SD / (s**2 + SD**2).sqrt()
    c_in = 1 / (s**2 + SD**2).sqrt()
    c_noise = s.log() / 4
    expected = c_skip * x.double() + c_out * (2 * c_in * x.double() + c_noise)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(backbone.seen["x"].double(), c_in * x.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(backbone.seen["c_noise"].double(), c_noise.flatten(), rtol=1e-6, atol=1e-7)
    assert backbone.seen["onehot"].tolist() == [[0, 1], [1, 0], [0, 1]]


def test_loss_is_weighted_denoising_error() -> None:
    x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    z = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    noise = torch.randn_like(x)
    loss_fn = EDMLoss()

    def zero(x_noisy: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_noisy)

    sigma = torch.exp(-1.2 + 1.2 * z)
    expected = (sigma**2 + SD**2) / (sigma * SD) ** 2 * x.square().mean(dim=(1, 2, 3))
    got = loss_fn(zero, x, torch.zeros(4, 1), ln_sigma_noise=z, noise=noise)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)

    def oracle(x_noisy: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return x_noisy - sigma.reshape(-1, 1, 1, 1) * noise

    assert float(loss_fn(oracle, x, torch.zeros(4, 1), ln_sigma_noise=z, noise=noise).max()) < 1e-9


def test_loss_sigma_distribution_is_lognormal() -> None:
    loss_fn = EDMLoss()
    z, _ = loss_fn.draw(torch.zeros(20000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    ln_s = loss_fn.sigmas(z).log()
    assert float(ln_s.mean()) == pytest.approx(-1.2, abs=0.03)
    assert float(ln_s.std()) == pytest.approx(1.2, abs=0.03)


def test_edm_sigmas_schedule() -> None:
    s = edm_sigmas(18, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert s.dtype == torch.float64 and s.shape == (19,)
    assert float(s[0]) == pytest.approx(80.0, rel=1e-12)
    assert float(s[17]) == pytest.approx(0.002, rel=1e-12)
    assert float(s[18]) == 0.0
    assert bool(torch.all(s[1:] < s[:-1]))
    i = np.arange(18)
    ref = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s[:-1].numpy(), ref, rtol=1e-13)
    default = edm_sigmas(10, append_zero=False)
    assert default.shape == (10,) and float(default[0]) == 10.0 and float(default[-1]) == 0.004
    with pytest.raises(ValueError, match="sigma_min"):
        edm_sigmas(10, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="steps"):
        edm_sigmas(0)
