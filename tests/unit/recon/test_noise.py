"""Noise covariance, whitening matrix and prewhitening."""

from __future__ import annotations

import pytest
import torch

from recon_server.recon.noise import noise_covariance, prewhiten, whitening_matrix


def _correlated_noise(coils: int, samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(coils, coils, dtype=torch.complex64, generator=g) + 2 * torch.eye(coils)
    white = torch.randn(coils, samples, dtype=torch.complex64, generator=g)  # E|n|^2 = 1
    return mix @ white, mix


def test_whitening_makes_noise_white() -> None:
    noise, _ = _correlated_noise(6, 20000)
    w = whitening_matrix(noise)
    assert w.shape == (6, 6) and w.dtype == torch.complex64
    assert torch.allclose(torch.tril(w), w), "W = inv(chol) is lower triangular"
    cov = noise_covariance(noise)
    ident = w.to(torch.complex128) @ cov @ w.to(torch.complex128).mH
    assert torch.allclose(ident, torch.eye(6, dtype=torch.complex128), atol=1e-4)
    # Fresh noise from the same channels: unit variance per complex sample, uncorrelated.
    fresh, _ = _correlated_noise(6, 20000, seed=0)
    white = w @ fresh
    emp = (white @ white.mH) / white.shape[1]
    assert torch.allclose(emp, torch.eye(6, dtype=torch.complex64), atol=0.05)


def test_prewhiten_applies_matrix_over_coil_axis() -> None:
    noise, _ = _correlated_noise(4, 5000)
    w = whitening_matrix(noise)
    k = torch.randn(3, 4, 8, 10, dtype=torch.complex64)
    out = prewhiten(k, w)
    expected = torch.stack(
        [torch.stack([(w[c, :, None, None] * k[s]).sum(0) for c in range(4)]) for s in range(3)]
    )
    assert torch.allclose(out, expected, atol=1e-5)
    assert prewhiten(k[0], w).shape == (4, 8, 10)


def test_singular_or_bad_noise() -> None:
    noise, _ = _correlated_noise(4, 2000)
    dup = noise.clone()
    dup[3] = dup[2]  # duplicated channel
    with pytest.raises(ValueError, match="singular"):
        whitening_matrix(dup)
    dead = noise.clone()
    dead[1] = 0  # dead channel
    with pytest.raises(ValueError, match="singular"):
        whitening_matrix(dead)
    with pytest.raises(ValueError, match="singular"):
        whitening_matrix(torch.zeros(4, 100, dtype=torch.complex64))
    with pytest.raises(ValueError, match="samples for 4 coils"):
        whitening_matrix(noise[:, :3])
    nan = noise.clone()
    nan[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        whitening_matrix(nan)
    with pytest.raises(ValueError, match="coils, samples"):
        whitening_matrix(noise[None])


def test_prewhiten_bad_input() -> None:
    w = torch.eye(4, dtype=torch.complex64)
    k = torch.randn(2, 4, 8, 8, dtype=torch.complex64)
    with pytest.raises(ValueError, match="does not match 3 coils"):
        prewhiten(k[:, :3], w)
    k[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        prewhiten(k, w)
    with pytest.raises(ValueError, match="coils, ky, kx"):
        prewhiten(torch.zeros(8, 8, dtype=torch.complex64), w)
