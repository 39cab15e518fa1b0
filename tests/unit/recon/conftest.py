"""Fixtures for the reconstruction-core tests: a small brain-like phantom, coil maps, k-space.

Everything is tiny (64x64 .. 96x96, 4-8 coils) so the whole folder runs in well under two minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import Tensor

from recon_server.recon.fft import fft2c

# (value, centre y, centre x, semi-axis y, semi-axis x, angle deg): a skull, brain, ventricles,
# a few grey/white-like blobs and a small bright lesion, in [-1, 1] coordinates.
_ELLIPSES = (
    (1.0, 0.0, 0.0, 0.92, 0.72, 0.0),
    (-0.8, 0.0, 0.0, 0.86, 0.66, 0.0),
    (0.25, 0.05, 0.0, 0.72, 0.54, 0.0),
    (-0.2, 0.05, -0.13, 0.28, 0.08, -15.0),
    (-0.2, 0.05, 0.13, 0.28, 0.08, 15.0),
    (0.15, -0.45, 0.0, 0.1, 0.2, 0.0),
    (0.1, 0.45, 0.25, 0.12, 0.1, 30.0),
    (0.1, 0.45, -0.25, 0.12, 0.1, -30.0),
    (0.3, -0.2, 0.35, 0.05, 0.05, 0.0),
    (0.05, 0.3, 0.0, 0.2, 0.3, 0.0),
)


def brain_phantom(n: int, *, seed: int = 0) -> np.ndarray:
    """Complex ``(n, n)`` brain-like image: ellipses, a mild texture, and a smooth phase."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    img = np.zeros((n, n))
    for val, cy, cx, ay, ax, ang in _ELLIPSES:
        t = np.deg2rad(ang)
        u = (yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)
        v = -(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
        img[(u / ay) ** 2 + (v / ax) ** 2 <= 1] += val
    rng = np.random.default_rng(seed)
    freq2 = np.fft.fftfreq(n)[:, None] ** 2 + np.fft.fftfreq(n)[None] ** 2
    tex = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * np.exp(-freq2 * (n / 6) ** 2)))
    img = img * (1 + 0.3 * tex / (np.abs(tex).max() + 1e-12)) * (img > 0)
    phase = 0.6 * xx + 0.4 * yy**2
    return (img * np.exp(1j * phase)).astype(np.complex64)


def coil_maps(n: int, coils: int) -> np.ndarray:
    """Smooth complex ``(coils, n, n)`` sensitivities around a circle, normalised to ``sum |S|^2 = 1``."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    maps = []
    for c in range(coils):
        a = 2 * np.pi * c / coils
        cy, cx = 1.3 * np.sin(a), 1.3 * np.cos(a)
        mag = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 1.2)
        maps.append(mag * np.exp(1j * (a + 0.5 * (xx * np.cos(a) - yy * np.sin(a)))))
    s = np.stack(maps)
    s /= np.sqrt((np.abs(s) ** 2).sum(0, keepdims=True))
    return s.astype(np.complex64)


@dataclass
class Case:
    """One simulated multi-coil slice batch."""

    image: Tensor  # complex64 (slices, n, n), the truth
    maps: Tensor  # complex64 (slices, coils, n, n)
    full: Tensor  # fully sampled noisy k-space (slices, coils, n, n)
    support: Tensor  # bool (slices, n, n) object support


def make_case(
    n: int = 64,
    coils: int = 8,
    slices: int = 1,
    *,
    noise: float = 0.0,
    snr: float | None = None,
    seed: int = 0,
) -> Case:
    """Simulate ``slices`` phantom slices with ``coils`` coils and complex Gaussian k-space noise.

    ``noise`` is the noise standard deviation relative to the RMS of the noiseless k-space;
    ``snr`` (if given, instead) sets it to ``p99(|image|) / snr``, the convention of
    ``benchmarks/bench_recon.py --tune`` (unitary FFT: the same sigma in image and k-space).
    """
    imgs = np.stack([brain_phantom(n, seed=seed + s) for s in range(slices)])
    maps = np.broadcast_to(coil_maps(n, coils), (slices, coils, n, n)).copy()
    image = torch.from_numpy(imgs)
    maps_t = torch.from_numpy(maps)
    k = fft2c(maps_t * image[:, None])
    if noise > 0 or snr is not None:
        g = torch.Generator().manual_seed(seed + 1000)
        sd = (
            noise * k.abs().pow(2).mean().sqrt()
            if snr is None
            else float(np.percentile(np.abs(imgs), 99)) / snr
        )
        k = k + sd * _crandn(tuple(k.shape), g, torch.complex64) / 2**0.5
    support = torch.from_numpy(np.abs(imgs) > 1e-3)
    return Case(image=image, maps=maps_t, full=k.to(torch.complex64), support=support)


@pytest.fixture(scope="session")
def case64() -> Case:
    """64x64, 8 coils, one slice, 1% noise."""
    return make_case(64, 8, 1, noise=0.01)


@pytest.fixture(scope="session")
def case_factory() -> Callable[..., Case]:
    return make_case


def _crandn(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    re = torch.randn(shape, generator=gen, dtype=real)
    return torch.complex(re, torch.randn(shape, generator=gen, dtype=real))


def check_adjoint(
    forward: Callable[[Tensor], Tensor],
    adjoint: Callable[[Tensor], Tensor],
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    *,
    normal: Callable[[Tensor], Tensor] | None = None,
    dtype: torch.dtype = torch.complex64,
    rtol: float = 1e-4,
    seed: int = 0,
) -> None:
    """Assert that ``adjoint`` is the adjoint of the linear map ``forward`` (mrpro/sigpy style).

    Checks: output shapes; ``<A u, v> == <u, A^H v>``; ``normal(u) == A^H A u``; the autograd
    gradient of ``Re <A u, v>`` with respect to ``u`` equals ``A^H v``.
    """
    gen = torch.Generator().manual_seed(seed)
    u = _crandn(in_shape, gen, dtype)
    v = _crandn(out_shape, gen, dtype)
    au = forward(u)
    ahv = adjoint(v)
    assert tuple(au.shape) == out_shape, f"forward shape {tuple(au.shape)} != {out_shape}"
    assert tuple(ahv.shape) == in_shape, f"adjoint shape {tuple(ahv.shape)} != {in_shape}"
    lhs = torch.vdot(au.flatten(), v.flatten())
    rhs = torch.vdot(u.flatten(), ahv.flatten())
    assert abs(lhs - rhs) <= rtol * abs(lhs), f"<Au,v>={lhs} != <u,A^H v>={rhs}"
    if normal is not None:
        torch.testing.assert_close(normal(u), adjoint(au), rtol=rtol, atol=rtol * float(au.abs().max()))
    uu = u.clone().requires_grad_(True)
    torch.vdot(forward(uu).flatten(), v.flatten()).real.backward()
    assert uu.grad is not None
    # d Re<Au, v> / d conj(u) in PyTorch's convention is A^H v.
    torch.testing.assert_close(uu.grad, ahv, rtol=rtol, atol=rtol * float(ahv.abs().max()))


@pytest.fixture(scope="session")
def adjoint_check() -> Callable[..., None]:
    """The reusable adjoint-test helper :func:`check_adjoint`."""
    return check_adjoint


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test, restored afterwards (``pytestmark = usefixtures``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
