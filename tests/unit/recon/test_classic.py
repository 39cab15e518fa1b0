"""Zero-filled, RSS, CG, CG-SENSE, wavelets and L1-wavelet: correctness and agreement with sigpy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import pywt
import sigpy.mri.app as app
import torch

from recon_server.recon import wavelets
from recon_server.recon.classic import cg_sense, conjugate_gradient, l1_wavelet, rss, zero_filled
from recon_server.recon.masks import equispaced_mask, mask_2d
from recon_server.recon.sense import SenseOperator
from recon_server.recon.wavelets import (
    WAVELETS,
    conv_wavelet_forward,
    conv_wavelet_inverse,
    wavelet_forward,
    wavelet_inverse,
)


def _nrmse(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x.abs() - truth.abs()).norm() / truth.abs().norm())


@pytest.fixture(scope="module")
def r4_case(case_factory):
    """96x96, 8 coils, SNR 30 (p99 / sigma, as in the tuning), R=4 equispaced (fastMRI centre 8%)."""
    case = case_factory(96, 8, 1, snr=30.0, seed=11)
    mask = torch.from_numpy(mask_2d(equispaced_mask(96, 4, offset=1), 96))
    return case, mask, case.full * mask


def test_zero_filled_and_rss_fully_sampled(case64) -> None:
    x = zero_filled(case64.full, case64.maps)
    assert x.shape == (1, 64, 64) and x.is_complex()
    assert _nrmse(x, case64.image) < 0.03  # only the 1% noise
    # sum |S|^2 = 1, so RSS = |x| (plus noise).
    assert _nrmse(rss(case64.full).to(torch.complex64), case64.image) < 0.05
    assert rss(case64.full).dtype == torch.float32


def test_conjugate_gradient_solves_spd_systems() -> None:
    g = torch.Generator().manual_seed(0)
    mats = torch.randn(3, 20, 20, dtype=torch.complex128, generator=g)
    spd = mats @ mats.mH + 0.5 * torch.eye(20, dtype=torch.complex128)
    b = torch.randn(3, 20, 1, dtype=torch.complex128, generator=g)
    seen: list[int] = []
    x = conjugate_gradient(
        lambda v: spd @ v, b, iters=200, tol=1e-10, dims=(-2, -1), callback=lambda i, *_: seen.append(i)
    )
    assert torch.allclose(x, torch.linalg.solve(spd, b), atol=1e-6)
    assert 0 < len(seen) < 200  # stopped on tolerance
    # One global system (dims=None) and a warm start at the solution stops at once.
    x2 = conjugate_gradient(lambda v: spd @ v, b, iters=200, tol=1e-10)
    assert torch.allclose(x2, x, atol=1e-6)
    calls: list[int] = []
    conjugate_gradient(lambda v: spd @ v, b, iters=50, tol=1e-6, x0=x, callback=lambda i, *_: calls.append(i))
    assert calls == []


def test_preconditioned_conjugate_gradient_needs_fewer_iterations() -> None:
    # A badly scaled system (diagonal 1..1e4 plus a small coupling): the Jacobi preconditioner
    # gives the same solution in far fewer iterations.
    g = torch.Generator().manual_seed(1)
    coupling = torch.randn(40, 40, dtype=torch.float64, generator=g) * 0.05
    diagonal = torch.logspace(0, 4, 40, dtype=torch.float64)
    spd = torch.diag(diagonal) + coupling @ coupling.T
    b = torch.randn(40, 1, dtype=torch.float64, generator=g)
    plain: list[int] = []
    preconditioned: list[int] = []
    x = conjugate_gradient(lambda v: spd @ v, b, iters=500, tol=1e-10, callback=lambda i, *_: plain.append(i))
    xp = conjugate_gradient(
        lambda v: spd @ v,
        b,
        iters=500,
        tol=1e-10,
        preconditioner=lambda r: r / torch.diagonal(spd)[:, None],
        callback=lambda i, *_: preconditioned.append(i),
    )
    exact = torch.linalg.solve(spd, b)
    assert torch.allclose(x, exact, atol=1e-8) and torch.allclose(xp, exact, atol=1e-8)
    assert len(preconditioned) < len(plain) / 2, (len(preconditioned), len(plain))


def test_cg_sense_no_worse_than_sigpy(r4_case) -> None:
    case, mask, y = r4_case
    ours = _nrmse(cg_sense(y, case.maps, mask), case.image)
    # sigpy gets the best of its own lambda grid (same objective up to a factor 1/2).
    theirs = min(
        _nrmse(
            torch.from_numpy(
                app.SenseRecon(
                    y[0].numpy(),
                    case.maps[0].numpy(),
                    lamda=lam,
                    weights=mask.numpy().astype(np.float32),
                    max_iter=30,
                    show_pbar=False,
                ).run()
            )[None],
            case.image,
        )
        for lam in (0.0, 1e-3, 1e-2, 3e-2)
    )
    assert ours <= 1.1 * theirs, (ours, theirs)
    assert ours < 0.9 * _nrmse(zero_filled(y, case.maps), case.image)


def test_l1_wavelet_no_worse_than_sigpy(r4_case) -> None:
    case, mask, y = r4_case
    ours = _nrmse(l1_wavelet(y, case.maps, mask), case.image)
    theirs = min(
        _nrmse(
            torch.from_numpy(
                app.L1WaveletRecon(
                    y[0].numpy(),
                    case.maps[0].numpy(),
                    lam,
                    weights=mask.numpy().astype(np.float32),
                    max_iter=100,
                    show_pbar=False,
                ).run()
            )[None],
            case.image,
        )
        for lam in (3e-4, 1e-3, 3e-3)
    )
    assert ours <= 1.1 * theirs, (ours, theirs)


def test_solvers_are_scale_invariant(r4_case) -> None:
    case, mask, y = r4_case
    for solve in (cg_sense, l1_wavelet):
        a = solve(y, case.maps, mask)
        b = solve(y * 1e4, case.maps, mask)
        assert torch.allclose(b / 1e4, a, rtol=1e-3, atol=1e-3 * float(a.abs().max())), solve.__name__


def test_solvers_batch_slices_independently(case_factory) -> None:
    case = case_factory(48, 4, 2, noise=0.01, seed=2)
    mask = torch.from_numpy(mask_2d(equispaced_mask(48, 2, offset=0), 48))
    y = case.full * mask
    for solve in (cg_sense, l1_wavelet):
        both = solve(y, case.maps, mask)
        one = solve(y[1:], case.maps[1:], mask)
        assert torch.allclose(both[1:], one, atol=1e-4 * float(one.abs().max())), solve.__name__


@pytest.mark.parametrize("name", sorted(WAVELETS))
def test_wavelet_orthogonal(name: str, adjoint_check: Callable[..., None]) -> None:
    x = torch.randn(2, 32, 48, dtype=torch.complex64)
    approx, details = wavelet_forward(x, wavelet=name, levels=3)
    assert len(details) == 3 and details[0].shape == (2, 3, 16, 24) and approx.shape == (2, 4, 6)
    back = wavelet_inverse(approx, details, wavelet=name)
    assert torch.allclose(back, x, atol=1e-5)
    energy = approx.abs().pow(2).sum() + sum(d.abs().pow(2).sum() for d in details)
    assert torch.allclose(energy, x.abs().pow(2).sum(), rtol=1e-5)
    sizes = [approx.numel()] + [d.numel() for d in details]

    def fwd(v: torch.Tensor) -> torch.Tensor:
        a, ds = wavelet_forward(v, wavelet=name, levels=3)
        return torch.cat([a.flatten()] + [d.flatten() for d in ds])

    def adj(c: torch.Tensor) -> torch.Tensor:
        parts = torch.split(c, sizes)
        return wavelet_inverse(
            parts[0].reshape(approx.shape),
            [p.reshape(d.shape) for p, d in zip(parts[1:], details, strict=True)],
            wavelet=name,
        )

    adjoint_check(fwd, adj, (2, 32, 48), (sum(sizes),))


@pytest.mark.parametrize("name", sorted(WAVELETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
def test_cpu_and_device_wavelets_agree(name: str, dtype: torch.dtype) -> None:
    """The CPU path (PyWavelets) and the torch convolutions (CUDA, autograd) give the same
    coefficients and the same inverse, dtype kept; odd sizes stop the levels alike."""
    for shape in ((2, 3, 64, 96), (1, 40, 36)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
        levels = wavelets._levels(shape[-2:], 4, len(WAVELETS[name]))
        approx, details = wavelet_forward(x, wavelet=name, levels=4)
        conv_approx, conv_details = conv_wavelet_forward(x, name, levels)
        tol = 1e-5 if dtype in (torch.float32, torch.complex64) else 1e-12
        assert approx.dtype == dtype and len(details) == len(conv_details) == levels
        assert torch.allclose(approx, conv_approx, atol=tol)
        for ours, conv in zip(details, conv_details, strict=True):
            assert torch.allclose(ours, conv, atol=tol)
        back = wavelet_inverse(approx, details, wavelet=name)
        assert back.dtype == dtype and torch.allclose(back, x, atol=tol)
        assert torch.allclose(conv_wavelet_inverse(conv_approx, conv_details, name), back, atol=tol)
    grad = x.clone().requires_grad_(True)  # autograd takes the convolutions
    wavelet_forward(grad, wavelet=name, levels=2)[0].abs().sum().backward()
    assert grad.grad is not None and torch.isfinite(grad.grad).all()


def test_wavelet_matches_pywt_energy_split() -> None:
    """Same filters as pywt's db4 (periodization): identical energy per sub-band."""
    x = np.random.default_rng(0).normal(size=(64, 64))
    coeffs = pywt.wavedec2(x, "db4", mode="periodization", level=2)
    approx, details = wavelet_forward(torch.from_numpy(x), levels=2)
    assert np.isclose(float((approx**2).sum()), float((coeffs[0] ** 2).sum()), rtol=0.2)
    ours = sorted(float((details[0][i] ** 2).sum()) for i in range(3)) + sorted(
        float((details[1][i] ** 2).sum()) for i in range(3)
    )
    theirs = sorted(float((b**2).sum()) for b in coeffs[2]) + sorted(float((b**2).sum()) for b in coeffs[1])
    assert np.allclose(sum(ours), sum(theirs), rtol=0.05)


def test_bad_input(case64) -> None:
    mask = torch.ones(64, 64)
    bad = case64.full.clone()
    bad[0, 0, 5, 5] = complex(float("nan"), 0.0)
    for fn in (cg_sense, l1_wavelet):
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(bad, case64.maps, mask)
        with pytest.raises(ValueError, match="maps shape"):
            fn(case64.full, case64.maps[:, :4], mask)
        with pytest.raises(ValueError, match="mask shape"):
            fn(case64.full, case64.maps, torch.ones(32, 64))
    inf = case64.full.clone()
    inf[0, 1, 0, 0] = complex(float("inf"), 0.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        zero_filled(inf, case64.maps)
    with pytest.raises(ValueError, match="kspace must be"):
        zero_filled(case64.full[0], case64.maps)
    with pytest.raises(ValueError, match="must be complex"):
        cg_sense(case64.full.real, case64.maps, mask)
    with pytest.raises(ValueError, match="unknown wavelet"):
        l1_wavelet(case64.full, case64.maps, mask, wavelet="sym99")
    with pytest.raises(ValueError, match="unknown wavelet"):
        l1_wavelet(case64.full, case64.maps, mask, wavelet=("haar", "sym99"))
    with pytest.raises(ValueError, match="at least one family"):
        l1_wavelet(case64.full, case64.maps, mask, wavelet=())
    with pytest.raises(ValueError, match="lam must be"):
        cg_sense(case64.full, case64.maps, mask, lam=-1.0)
    with pytest.raises(ValueError, match="weight_scale must be"):
        cg_sense(case64.full, case64.maps, mask, weight_scale=float("nan"))
    with pytest.raises(ValueError, match="weight_scale must be"):
        cg_sense(case64.full, case64.maps, mask, weight_scale=float("inf"))


def test_sense_operator_with_estimated_scale_is_consistent(r4_case) -> None:
    """Data consistency: the CG-SENSE solution reproduces the measured samples closely."""
    case, mask, y = r4_case
    x = cg_sense(y, case.maps, mask)
    resid = SenseOperator(case.maps, mask).forward(x) - y
    assert float(resid.norm() / y.norm()) < 0.2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_solvers_cuda_match_cpu(r4_case) -> None:
    case, mask, y = r4_case
    for solve in (cg_sense, l1_wavelet):
        cpu = solve(y, case.maps, mask)
        gpu = solve(y.cuda(), case.maps.cuda(), mask.cuda())
        assert gpu.device.type == "cuda"
        assert torch.allclose(gpu.cpu(), cpu, atol=1e-3 * float(cpu.abs().max())), solve.__name__
