"""The image's power spectrum from its measured k-space (CG-SENSE's Wiener penalty)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon_server.recon.fft import fft2c
from recon_server.recon.spectrum import SPECTRUM_FLOOR, _rings, signal_spectrum

N, COILS = 96, 6


def _image() -> torch.Tensor:
    """A random texture with a power-law spectrum (as anatomy has) inside a soft-edged disc."""
    rng = np.random.default_rng(1)
    freq = np.hypot(*np.meshgrid(np.fft.fftfreq(N), np.fft.fftfreq(N), indexing="ij"))
    texture = np.fft.ifft2(np.fft.fft2(rng.normal(size=(N, N))) / (1 + freq / 0.02) ** 1.5).real
    yy, xx = np.meshgrid(np.linspace(-1, 1, N), np.linspace(-1, 1, N), indexing="ij")
    window = 1 / (1 + np.exp((np.hypot(xx, yy) - 0.75) / 0.03))
    return torch.from_numpy((window * (1 + texture / texture.std())).astype(np.complex64))


def _coils() -> torch.Tensor:
    yy, xx = np.meshgrid(np.linspace(-1, 1, N), np.linspace(-1, 1, N), indexing="ij")
    maps = np.stack(
        [np.exp(-((yy - np.sin(a)) ** 2 + (xx - np.cos(a)) ** 2)) * np.exp(1j * a) for a in np.arange(COILS)]
    )
    return torch.from_numpy((maps / np.sqrt((np.abs(maps) ** 2).sum(0))).astype(np.complex64))


def _ring_means(power: torch.Tensor) -> torch.Tensor:
    index, count = _rings(N, N, power.device)
    sums = torch.zeros(count).index_add_(0, index, power.flatten().float())
    return sums / torch.zeros(count).index_add_(0, index, torch.ones(N * N))


def test_the_spectrum_of_a_noisy_undersampled_scan_is_the_image_s() -> None:
    image = _image()
    true_rings = _ring_means(fft2c(image).abs().square())
    sigma = 0.02
    gen = torch.Generator().manual_seed(0)
    k = fft2c(_coils() * image)[None]
    k = k + sigma * torch.randn(k.shape, generator=gen, dtype=torch.complex64)
    mask = torch.zeros(N, N)
    mask[::2] = 1  # R 2: every ring keeps samples
    estimate = signal_spectrum(k * mask, mask, torch.tensor([sigma]))
    assert estimate.shape == (1, N, N)
    rings = _ring_means(estimate[0])
    strong = true_rings > 30 * sigma**2  # where the signal stands above the noise
    strong[0] = False  # DC: the coils' narrow k-space support blurs it into its neighbours
    assert int(strong.sum()) > 25
    ratio = rings[strong] / true_rings[strong]
    assert float(ratio.min()) > 0.75 and float(ratio.max()) < 1.25, ratio


def test_rings_without_a_measured_sample_get_the_floor() -> None:
    k = fft2c(_coils() * _image())[None]
    mask = torch.zeros(N, N)
    mask[N // 2 - 8 : N // 2 + 8, N // 2 - 8 : N // 2 + 8] = 1
    estimate = signal_spectrum(k * mask, mask, torch.tensor([0.01]))
    assert float(estimate[0, 0, 0]) == pytest.approx(SPECTRUM_FLOOR * 1e-4, rel=1e-5)
    assert float(estimate[0, N // 2, N // 2]) > 1e3 * float(estimate[0, 0, 0])


def test_the_spectrum_scales_with_the_data_and_stays_finite_without_noise() -> None:
    k = fft2c(_coils() * _image())[None]
    mask = torch.ones(N, N)
    one = signal_spectrum(k, mask, torch.tensor([0.01]))
    scaled = signal_spectrum(k * 1e3, mask, torch.tensor([10.0]))
    torch.testing.assert_close(scaled, one * 1e6, rtol=1e-4, atol=0.0)
    noiseless = signal_spectrum(k, mask, torch.tensor([0.0]))
    assert bool(torch.isfinite(noiseless).all()) and float(noiseless.min()) > 0
