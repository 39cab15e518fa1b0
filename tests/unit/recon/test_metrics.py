"""NRMSE / PSNR / SSIM conventions, and SSIM/PSNR agreement with scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from recon_server.research.quality import nrmse, psnr, ssim


@pytest.mark.parametrize("seed", range(5))
def test_ssim_and_psnr_match_skimage(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(20, 60, size=2))
    truth = rng.random(shape) * rng.uniform(0.5, 100)
    recon = np.abs(truth + rng.normal(scale=truth.std() * rng.uniform(0.05, 1.0), size=shape))
    ref_ssim = structural_similarity(recon, truth, data_range=truth.max())
    assert abs(ssim(recon, truth) - ref_ssim) < 1e-3
    assert abs(psnr(recon, truth) - peak_signal_noise_ratio(truth, recon, data_range=truth.max())) < 1e-6


def test_volume_ssim_is_mean_of_slice_ssim_with_volume_range() -> None:
    rng = np.random.default_rng(9)
    truth = rng.random((3, 32, 40))
    truth[1] *= 0.5
    recon = np.abs(truth + 0.1 * rng.normal(size=truth.shape))
    per_slice = [structural_similarity(recon[i], truth[i], data_range=truth.max()) for i in range(3)]
    assert abs(ssim(recon, truth) - float(np.mean(per_slice))) < 1e-3


def test_nrmse_psnr_definitions_and_inputs() -> None:
    rng = np.random.default_rng(1)
    truth = rng.random((2, 16, 16)) + 0.1
    recon = truth + 0.05 * rng.normal(size=truth.shape)
    expected = np.linalg.norm(np.abs(recon) - truth) / np.linalg.norm(truth)
    assert nrmse(recon, truth) == pytest.approx(expected)
    mse = np.mean((np.abs(recon) - truth) ** 2)
    assert psnr(recon, truth) == pytest.approx(10 * np.log10(truth.max() ** 2 / mse))
    # Complex torch inputs are compared by magnitude: a phase does not count.
    phase = torch.exp(1j * torch.from_numpy(rng.uniform(-3, 3, size=truth.shape)))
    assert nrmse(torch.from_numpy(recon) * phase, torch.from_numpy(truth)) == pytest.approx(
        expected, rel=1e-6
    )
    assert psnr(truth, truth) == float("inf")


def test_fit_scale_and_mask() -> None:
    rng = np.random.default_rng(2)
    truth = rng.random((24, 24)) + 0.5
    assert nrmse(3.0 * truth, truth) == pytest.approx(2.0)
    assert nrmse(3.0 * truth, truth, fit_scale=True) < 1e-12
    assert ssim(0.5 * truth, truth, fit_scale=True) == pytest.approx(1.0)
    recon = truth.copy()
    recon[:8] += 1.0  # errors only in the top rows
    mask = np.zeros_like(truth, dtype=bool)
    mask[12:] = True
    assert nrmse(recon, truth, mask=mask) == 0.0
    assert nrmse(recon, truth) > 0.1
    assert ssim(recon, truth, mask=mask) == pytest.approx(1.0)
    # A 2-D mask broadcasts over slices.
    vol = np.stack([recon, recon])
    assert nrmse(vol, np.stack([truth, truth]), mask=mask) == 0.0


def test_bad_metric_input() -> None:
    a = np.ones((8, 8))
    with pytest.raises(ValueError, match="does not match"):
        nrmse(a, np.ones((8, 9)))
    with pytest.raises(ValueError, match="rows, cols"):
        psnr(np.ones(8), np.ones(8))
    with pytest.raises(ValueError, match="NaN or inf"):
        ssim(a * np.nan, a)
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ssim(np.ones((5, 5)), np.ones((5, 5)))
    with pytest.raises(ValueError, match="mask selects no pixel"):
        nrmse(a, a, mask=np.zeros((8, 8), bool))
    with pytest.raises(ValueError, match="reference is zero"):
        nrmse(a, np.zeros((8, 8)))
