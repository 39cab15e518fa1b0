"""Regularisation from the noise level: the estimate, scale invariance, the rule vs a sweep, BART."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from recon_server.recon.classic import cg_sense, l1_wavelet
from recon_server.recon.coils import calibration_region, espirit_maps
from recon_server.recon.fft import fft2c
from recon_server.recon.noise import noise_level
from recon_server.research import bart
from recon_server.research.quality import nrmse

N, COILS, ACS = 128, 8, 16
COLIN_BETTER = Path("/usr/share/mricron/templates/ch2better.nii.gz")


def _head() -> np.ndarray:
    """An axial slice of the real Colin27 head (Debian mricron-data, 0.5 mm ``ch2better``; a
    template the project may tune on), N x N over 240 mm, max 1."""
    if not COLIN_BETTER.exists():
        pytest.fail(f"{COLIN_BETTER} missing: install the Debian package mricron-data (make deps)")
    import nibabel as nib

    image = nib.load(COLIN_BETTER)
    z = int(image.shape[2] * 0.55)
    plane = np.asarray(image.dataobj[:, :, z], dtype=np.float32)  # type: ignore[attr-defined]
    zoom = 0.5 / (240.0 / N)
    img = ndimage.zoom(ndimage.gaussian_filter(np.rot90(plane), 0.5 / zoom / 2.355), zoom, order=1)[:N, :N]
    pad = [((N - n) // 2, N - n - (N - n) // 2) for n in img.shape]
    img = np.pad(img, pad)
    return img / img.max()


def _coils() -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(-1, 1, N), np.linspace(-1, 1, N), indexing="ij")
    maps = []
    for c in range(COILS):
        a = 2 * np.pi * c / COILS
        mag = np.exp(-((yy - 1.2 * np.sin(a)) ** 2 + (xx - 1.2 * np.cos(a)) ** 2) / 0.9)
        maps.append(mag * np.exp(1j * a))
    s = np.stack(maps)
    return (s / np.sqrt((np.abs(s) ** 2).sum(0, keepdims=True))).astype(np.complex64)


def _scan(sigma: float, accel: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = _head()
    k = fft2c(torch.from_numpy(_coils() * truth[None]))[None]
    k = k + torch.from_numpy(
        (rng.normal(size=k.shape) + 1j * rng.normal(size=k.shape)).astype(np.complex64)
    ) * (sigma / np.sqrt(2))
    lines = np.zeros(N, dtype=bool)
    lines[(N // 2) % accel :: accel] = True
    lines[N // 2 - ACS // 2 : N // 2 + ACS // 2] = True
    mask = torch.from_numpy(np.repeat(lines[:, None], N, axis=1))
    return k * mask, mask, truth


def _maps(k: torch.Tensor) -> torch.Tensor:
    return espirit_maps(calibration_region(k, (N // 2 - ACS // 2, N // 2 + ACS // 2)), (N, N))


def _error(image: torch.Tensor | np.ndarray, truth: np.ndarray) -> float:
    return nrmse(np.abs(np.asarray(image)).reshape(truth.shape), truth, mask=truth > 0.05, fit_scale=True)


@pytest.mark.parametrize("accel", [1, 2, 4])
@pytest.mark.parametrize("sigma", [0.005, 0.02, 0.06])
def test_noise_level_from_the_data(sigma: float, accel: int) -> None:
    # SNR 17-200 (max / sigma). At 128 x 1.9 mm the anatomy's own signal in the k-space corners
    # lifts the corner estimate (1.9x at sigma 0.005); the background columns are not fooled.
    k, mask, _ = _scan(sigma, accel)
    estimate = float(noise_level(k, mask)[0])
    assert estimate == pytest.approx(sigma, rel=0.05)


def test_noise_level_without_a_full_readout_uses_the_corners() -> None:
    # An asymmetric echo: no readout line is fully measured, so only the corners remain.
    k, mask, _ = _scan(0.06, 2)
    echo = mask.clone()
    echo[:, : N // 8] = False
    estimate = float(noise_level(k * echo, echo)[0])
    assert estimate == pytest.approx(0.06, rel=0.1)


def test_no_measured_periphery_is_a_clear_error() -> None:
    k, _, _ = _scan(0.01, 1)
    centre = torch.zeros(N, N, dtype=torch.bool)
    centre[N // 2 - 8 : N // 2 + 8, N // 2 - 8 : N // 2 + 8] = True
    with pytest.raises(ValueError, match="no measured k-space sample in the periphery"):
        noise_level(k * centre, centre)


@pytest.mark.parametrize("solver", [cg_sense, l1_wavelet])
def test_scaling_the_k_space_leaves_the_image_unchanged_up_to_scale(solver) -> None:  # noqa: ANN001
    k, mask, _ = _scan(0.01, 4)
    maps = _maps(k)
    reference = solver(k, maps, mask)
    for factor in (1e-3, 1e3):
        scaled = solver(k * factor, maps, mask) / factor
        np.testing.assert_allclose(
            scaled.numpy(), reference.numpy(), rtol=0, atol=2e-3 * float(reference.abs().max())
        )


@pytest.mark.parametrize("sigma", [0.02, 0.06])
def test_the_rule_is_near_the_best_weight_of_a_sweep(sigma: float) -> None:
    """One rule across noise levels: within 1.15x of the best weight of a sweep for both solvers
    (CG-SENSE: its Wiener penalty scaled by 2^-3 .. 2^2; L1-wavelet: fixed weights)."""
    k, mask, truth = _scan(sigma, 4, seed=3)
    maps = _maps(k)
    cg_auto = _error(cg_sense(k, maps, mask)[0], truth)
    cg_best = min(_error(cg_sense(k, maps, mask, weight_scale=2.0**e)[0], truth) for e in range(-3, 3))
    assert cg_auto <= 1.15 * cg_best, (sigma, cg_auto, cg_best)
    l1_auto = _error(l1_wavelet(k, maps, mask)[0], truth)
    l1_best = min(
        _error(l1_wavelet(k, maps, mask, lam=float(lam))[0], truth) for lam in np.logspace(-4, -1, 7)
    )
    assert l1_auto <= 1.15 * l1_best, (sigma, l1_auto, l1_best)


@pytest.mark.skipif(
    shutil.which("bart") is None, reason="bart not installed (Debian package bart; make deps)"
)
@pytest.mark.parametrize("sigma", [0.02, 0.06])
def test_the_rule_against_bart_tuned_by_an_oracle(sigma: float) -> None:
    """Ours without tuning <= BART pics at the best weight of a sweep, on the same k-space."""
    k, mask, truth = _scan(sigma, 4, seed=5)
    maps = _maps(k)
    ours_cg = _error(cg_sense(k, maps, mask)[0], truth)
    ours_l1 = _error(l1_wavelet(k, maps, mask)[0], truth)
    # The noise known, as after prewhitening with a noise scan.
    ours_l1_known = _error(l1_wavelet(k, maps, mask, noise_sigma=sigma)[0], truth)
    kspace = k.numpy()
    bart_l2 = min(
        _error(bart.pics(kspace, calibration_rows=ACS, regularization=f"Q:{r}", iters=100)[0], truth)
        for r in (1e-4, 1e-3, 1e-2, 3e-2, 1e-1)
    )
    bart_w = min(
        _error(bart.pics(kspace, calibration_rows=ACS, regularization=f"W:3:0:{r}", iters=100)[0], truth)
        for r in (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    )
    # Measured on this matrix (128, 1.9 mm, 8 coils; AMD EPYC) at sigma 0.02 / 0.06: CG-SENSE
    # (Wiener penalty) 0.0592 / 0.0976 vs BART -l2 0.0820 / 0.1233; L1 0.0574 / 0.1008 (noise
    # known, as after a noise scan: 0.0578 / 0.1011) vs BART W 0.0583 / 0.1061.
    assert ours_cg <= bart_l2, (ours_cg, bart_l2)
    assert ours_l1 <= bart_w, (ours_l1, bart_w)
    assert ours_l1_known <= bart_w, (ours_l1_known, bart_w)


def test_l1_weight_turns_from_sigma_squared_to_sigma_at_high_noise() -> None:
    from recon_server.recon.classic import L1_ARTIFACT_WEIGHT, L1_REFERENCE_FRACTION, l1_weight

    def noise_term(sigma: float) -> float:
        fraction = torch.tensor(L1_REFERENCE_FRACTION)
        return float(l1_weight(torch.tensor(sigma), fraction)) - L1_ARTIFACT_WEIGHT

    assert noise_term(2e-4) / noise_term(1e-4) == pytest.approx(4.0, rel=1e-2)
    assert noise_term(2e3) / noise_term(1e3) == pytest.approx(2.0, rel=1e-2)
