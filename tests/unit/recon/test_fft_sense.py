"""FFT conventions and the SENSE operator's adjointness, shapes, devices and bad input."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from recon_server.recon.fft import fft2c, ifft2c
from recon_server.recon.sense import SenseOperator


def test_fft_centred_unitary_and_inverse() -> None:
    x = torch.randn(3, 16, 12, dtype=torch.complex64)
    k = fft2c(x)
    torch.testing.assert_close(ifft2c(k), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.norm(), x.norm(), rtol=1e-5, atol=0)
    # A constant image puts all its energy at the centre sample (n//2, n//2).
    c = fft2c(torch.ones(16, 12, dtype=torch.complex64))
    assert torch.argmax(c.abs()).item() == 8 * 12 + 6
    # Same numbers as numpy's centred transform.
    ax = (-2, -1)
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x.numpy(), axes=ax), norm="ortho"), axes=ax)
    np.testing.assert_allclose(k.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_fft_adjoint(adjoint_check: Callable[..., None]) -> None:
    adjoint_check(fft2c, ifft2c, (2, 10, 14), (2, 10, 14))


@pytest.mark.parametrize("mask_kind", ["2d", "3d", "4d", "float"])
def test_sense_adjoint(adjoint_check: Callable[..., None], mask_kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    s, c, ky, kx = 2, 4, 12, 10
    maps = torch.randn(s, c, ky, kx, dtype=torch.complex64, generator=gen)
    lines = torch.rand(ky, generator=gen) > 0.5
    m2 = lines[:, None].expand(ky, kx)
    mask = {
        "2d": m2,
        "3d": m2[None].expand(s, ky, kx),
        "4d": m2[None, None].expand(s, 1, ky, kx),
        "float": torch.rand(s, ky, kx, generator=gen),
    }[mask_kind]
    op = SenseOperator(maps, mask)
    adjoint_check(op.forward, op.adjoint, (s, ky, kx), (s, c, ky, kx), normal=op.normal)
    # The adjoint object is itself a linear operator whose adjoint is A.
    adjoint_check(op.H.forward, op.H.adjoint, (s, c, ky, kx), (s, ky, kx), normal=op.H.normal)
    assert op.H.H is op


def test_sense_extra_batch_axis(adjoint_check: Callable[..., None]) -> None:
    maps = torch.randn(2, 3, 8, 8, dtype=torch.complex64)
    op = SenseOperator(maps, torch.ones(8, 8, dtype=torch.bool))
    adjoint_check(op.forward, op.adjoint, (5, 2, 8, 8), (5, 2, 3, 8, 8), normal=op.normal)


def test_sense_matches_explicit_model(case64) -> None:
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[::2] = True
    op = SenseOperator(case64.maps, mask)
    y = op(case64.image)
    expected = mask * fft2c(case64.maps * case64.image[:, None])
    torch.testing.assert_close(y, expected)
    # With normalised maps and a full mask, A^H A = I.
    full = SenseOperator(case64.maps, torch.ones(64, 64))
    torch.testing.assert_close(full.normal(case64.image), case64.image, rtol=1e-4, atol=1e-5)


def test_sense_bad_shapes() -> None:
    maps = torch.randn(1, 4, 8, 8, dtype=torch.complex64)
    with pytest.raises(ValueError, match="maps must be"):
        SenseOperator(torch.randn(4, 8, 8, dtype=torch.complex64), torch.ones(8, 8))
    with pytest.raises(ValueError, match="maps must be complex"):
        SenseOperator(torch.randn(1, 4, 8, 8), torch.ones(8, 8))
    with pytest.raises(ValueError, match="mask shape"):
        SenseOperator(maps, torch.ones(8, 9))
    with pytest.raises(ValueError, match="mask must be bool or real"):
        SenseOperator(maps, torch.ones(8, 8, dtype=torch.complex64))
    op = SenseOperator(maps, torch.ones(8, 8))
    with pytest.raises(ValueError, match="image must have shape"):
        op.forward(torch.zeros(1, 8, 7, dtype=torch.complex64))
    with pytest.raises(ValueError, match="k-space must have shape"):
        op.adjoint(torch.zeros(1, 3, 8, 8, dtype=torch.complex64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sense_cuda_matches_cpu(adjoint_check: Callable[..., None]) -> None:
    maps = torch.randn(2, 4, 16, 16, dtype=torch.complex64)
    mask = torch.rand(16, 16) > 0.5
    x = torch.randn(2, 16, 16, dtype=torch.complex64)
    cpu = SenseOperator(maps, mask)
    gpu = SenseOperator(maps.cuda(), mask.cuda())
    assert gpu.mask.device.type == "cuda"
    torch.testing.assert_close(gpu.normal(x.cuda()).cpu(), cpu.normal(x), rtol=1e-4, atol=1e-4)
