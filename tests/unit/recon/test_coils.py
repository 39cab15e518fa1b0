"""ESPIRiT and Inati coil maps: agreement with sigpy and the truth, shapes, batching, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import sigpy.mri.app as app
import torch

from recon_server.recon.coils import auto_kernel_size, calibration_region, espirit_maps, inati_maps


def _corr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """Normalised correlation |<a, b>| / (|a| |b|) over the pixels ``where`` (one global phase)."""
    a = a[..., where]
    b = b[..., where]
    return float(abs(torch.vdot(a.flatten(), b.flatten())) / (a.norm() * b.norm()))


def _pixelwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|<a(r), b(r)>| over coils, per pixel (phase-free agreement of unit-norm coil vectors)."""
    return (a.conj() * b).sum(dim=-3).abs()


@pytest.fixture(scope="module")
def acs_case(case_factory):
    case = case_factory(64, 8, 1, noise=0.01, seed=3)
    acs = (20, 44)  # 24 fully sampled rows around ky = 32
    return case, acs, calibration_region(case.full, acs)


def test_espirit_matches_sigpy(acs_case) -> None:
    case, acs, calib = acs_case
    ours = espirit_maps(calib, (64, 64))
    kz = torch.zeros_like(case.full[0])
    kz[:, acs[0] : acs[1]] = case.full[0, :, acs[0] : acs[1]]
    ref = torch.from_numpy(app.EspiritCalib(kz.numpy(), calib_width=24, show_pbar=False).run())[None]
    inside = case.support[0]
    assert _corr(ours, ref, inside) >= 0.99
    assert float(_pixelwise(ours, ref)[0][inside].min()) >= 0.99
    # Same crop decision (eigenvalue > 0.95) almost everywhere.
    assert float(((ours[0, 0] != 0) != (ref[0, 0] != 0)).float().mean()) < 0.01


def test_espirit_recovers_true_maps(acs_case) -> None:
    case, _, calib = acs_case
    maps = espirit_maps(calib, (64, 64))
    inside = case.support[0]
    agree = _pixelwise(maps, case.maps)[0][inside]
    assert float(agree.mean()) >= 0.99 and float(agree.min()) >= 0.95
    assert maps.shape == (1, 8, 64, 64) and maps.dtype == torch.complex64
    # Unit norm over coils inside the crop, zero outside; coil 0 has zero phase.
    norm = maps.abs().pow(2).sum(1)[0]
    kept = maps[0, 0] != 0
    assert torch.allclose(norm[kept], torch.ones(()), atol=1e-4)
    assert bool((norm[~kept] == 0).all())
    assert float(maps[0, 0][kept].imag.abs().max()) < 1e-5 and bool((maps[0, 0][kept].real >= 0).all())
    assert bool(kept[inside].all()), "crop removed object pixels"


def test_fast_eigensolver_matches_exact(acs_case) -> None:
    _, _, calib = acs_case
    fast = espirit_maps(calib, (64, 64), coarse=16, power_iters=4)
    exact = espirit_maps(calib, (64, 64), coarse=64, power_iters=1)  # eigh at full size
    both = (fast[0, 0] != 0) & (exact[0, 0] != 0)
    agree = _pixelwise(fast, exact)[0][both]
    assert float(agree.mean()) > 0.999


def test_batching_chunks_and_rectangular_shapes(case_factory) -> None:
    case = case_factory(48, 6, 2, noise=0.0, seed=5)
    calib = calibration_region(case.full, (14, 34), max_cols=20)
    assert calib.shape == (2, 6, 20, 20)
    both = espirit_maps(calib, (48, 48))
    one_by_one = espirit_maps(calib, (48, 48), max_chunk_bytes=1)
    assert torch.allclose(both, one_by_one, atol=1e-4)
    single = espirit_maps(calib[1:], (48, 48))
    assert torch.allclose(both[1:], single, atol=1e-4)
    rect = espirit_maps(calib, (48, 40))
    assert rect.shape == (2, 6, 48, 40)
    # Passing the full readout width is cut to the same central columns.
    full_width = case.full[..., 14:34, :]
    assert torch.allclose(espirit_maps(full_width, (48, 48), max_calib_cols=20), both, atol=1e-5)


def test_calibration_region_rule() -> None:
    k = torch.arange(2 * 3 * 40 * 50, dtype=torch.float32).reshape(2, 3, 40, 50).to(torch.complex64)
    calib = calibration_region(k, (10, 30))
    assert calib.shape == (2, 3, 20, 24)  # max(24, 20) columns
    assert torch.equal(calib, k[..., 10:30, 13:37])
    assert calibration_region(k, (5, 35)).shape[-1] == 30  # taller ACS: square block
    assert calibration_region(k, (10, 30), max_cols=100).shape[-1] == 50
    with pytest.raises(ValueError, match="ACS rows"):
        calibration_region(k, (30, 10))
    with pytest.raises(ValueError, match="kspace must be"):
        calibration_region(k[0], (10, 30))


def test_inati_maps_agree_with_truth(acs_case) -> None:
    case, _, calib = acs_case
    maps = inati_maps(calib, (64, 64))
    assert maps.shape == (1, 8, 64, 64)
    agree = _pixelwise(maps, case.maps)[0][case.support[0]]
    assert float(agree.mean()) >= 0.97


def test_kernel_shrinks_with_few_calibration_rows() -> None:
    # 6 by default; fewer rows (fastMRI's 4% centre at R >= 5: 10 of 256) get a smaller kernel.
    assert [auto_kernel_size(r) for r in (24, 20, 13, 12, 10, 8, 4)] == [6, 6, 6, 5, 4, 3, 3]


def test_bad_calibration() -> None:
    good = torch.randn(1, 4, 12, 12, dtype=torch.complex64)
    with pytest.raises(ValueError, match="smaller than the ESPIRiT kernel"):
        espirit_maps(good[..., :2, :], (32, 32))  # even the smallest automatic kernel (3) is too big
    with pytest.raises(ValueError, match="smaller than the ESPIRiT kernel"):
        espirit_maps(good[..., :4, :], (32, 32), kernel_size=6)
    with pytest.raises(ValueError, match="larger than the image"):
        espirit_maps(good, (8, 32))
    bad = good.clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        espirit_maps(bad, (32, 32))
    with pytest.raises(ValueError, match="no ACS signal"):
        espirit_maps(torch.zeros_like(good), (32, 32))
    with pytest.raises(ValueError, match="must be complex"):
        espirit_maps(good.real, (32, 32))
    with pytest.raises(ValueError, match="calibration must be a tensor"):
        espirit_maps(good[0], (32, 32))
    with pytest.raises(ValueError, match="NaN or inf"):
        inati_maps(bad, (32, 32))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_espirit_cuda_matches_cpu(acs_case) -> None:
    _, _, calib = acs_case
    cpu = espirit_maps(calib, (64, 64))
    gpu = espirit_maps(calib.cuda(), (64, 64))
    assert gpu.device.type == "cuda"
    both = (cpu[0, 0] != 0) & (gpu.cpu()[0, 0] != 0)
    assert float(_pixelwise(cpu, gpu.cpu())[0][both].mean()) > 0.999


def test_espirit_numpy_reference_kernel_count() -> None:
    """Threshold semantics: singular values above threshold * max are kept (like BART -t)."""
    rng = np.random.default_rng(0)
    calib = torch.from_numpy(
        (rng.normal(size=(1, 4, 12, 12)) + 1j * rng.normal(size=(1, 4, 12, 12))).astype(np.complex64)
    )
    # Pure noise: a tiny threshold keeps every kernel; the map is still unit-norm where kept.
    maps = espirit_maps(calib, (16, 16), threshold=1e-6, crop=0.0)
    norm = maps.abs().pow(2).sum(1)
    assert torch.allclose(norm, torch.ones_like(norm), atol=1e-3)
