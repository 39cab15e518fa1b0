"""Classical reconstructions: zero-filled, CG-SENSE (Wiener or Tikhonov), L1-wavelet compressed sensing.

All take k-space ``(slices, coils, ky, kx)`` (zeros where not acquired), coil maps of the same
shape and a mask (see :class:`recon_server.recon.sense.SenseOperator`), and return complex
images ``(slices, ky, kx)`` on the device of the inputs.

Scale: the service feeds k-space in arbitrary units, so the iterative solvers divide each slice
by ``s`` = the 99th percentile of the magnitude of its zero-filled image ``S^H F^H y`` and
multiply the result back. Regularisation weights therefore refer to images whose 99th
percentile is 1.

Regularisation from the noise level (docs/recon.md, "The weight rule"): with ``sigma`` the noise
standard deviation of one complex k-space sample (1 after prewhitening with a noise scan, else
:func:`recon_server.recon.noise.noise_level` from the data), the noise of one pixel
of the normalised zero-filled image is ``sigma_zf = sigma / s * sqrt(f)`` (``f`` the sampled
fraction of k-space, unit-energy coil maps). CG-SENSE's penalty is a Wiener filter,
``lam(k) = c sigma^2 / P(k)`` on the image's spatial frequencies (:func:`cg_penalty`), ``P`` the
image's power spectrum estimated from the measured k-space (:mod:`recon_server.recon.spectrum`):
the noise-to-signal power ratio of each frequency, strong where the image has little power and
weak where it has much. L1-wavelet
``lam = L1_NOISE_WEIGHT * sigma_zf^2 / (1 + sigma_zf / L1_NOISE_KNEE)`` plus a floor
(:func:`l1_weight`: a BayesShrink-like threshold, noise variance over a signal scale that the
normalisation fixes, turning into a universal-threshold-like ``sigma_zf`` law once the noise
rivals the signal, plus a floor for the undersampling artefacts that remain without noise, larger
the more of k-space is sampled).
The constants were fitted on Colin27 and simulator slices across noise level and R; an explicit ``lam``
overrides the rule. Iterations stop when the relative residual (CG) or the relative change of
the iterate (FISTA) falls below ``tol``, at most ``iters``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from recon_server.recon.fft import fft2c, ifft2c
from recon_server.recon.noise import noise_level
from recon_server.recon.sense import SenseOperator, as_mask
from recon_server.recon.spectrum import signal_spectrum
from recon_server.recon.wavelets import soft_threshold, wavelet_forward, wavelet_inverse

__all__ = [
    "CG_SENSE_ITERS",
    "CG_WIENER_KNEE",
    "CG_WIENER_WEIGHT",
    "L1_ARTIFACT_WEIGHT",
    "L1_ARTIFACT_EXPONENT",
    "L1_NOISE_KNEE",
    "L1_NOISE_WEIGHT",
    "L1_REFERENCE_FRACTION",
    "L1_WAVELETS",
    "L1_WAVELET_ITERS",
    "cg_sense",
    "cg_penalty",
    "conjugate_gradient",
    "data_scale",
    "l1_wavelet",
    "l1_weight",
    "pixel_noise",
    "rss",
    "sampled_fraction",
    "zero_filled",
]

# The weight rule (module docstring; fitted with benchmarks/bench_regularisation.py, docs/recon.md).
# Scales the Wiener penalty sigma^2 / P(k): CG_WIENER_WEIGHT (1 + sigma_zf / CG_WIENER_KNEE).
# 1 would be the MMSE filter of a stationary Gaussian image; the images are not, and the best
# scale measured 0.25-0.5 at low noise, approaching 1 as the noise rivals the signal.
CG_WIENER_WEIGHT = 0.3
CG_WIENER_KNEE = 0.1
L1_NOISE_WEIGHT = 24.0
# sigma_zf where L1's threshold turns from BayesShrink's sigma^2 to the universal threshold's sigma.
L1_NOISE_KNEE = 0.1
# The floor for the artefacts that remain without noise, at the sampled fraction
# L1_REFERENCE_FRACTION (R 4 + 24 calibration lines of 256), growing as the fraction ^ exponent.
L1_ARTIFACT_WEIGHT = 1e-3
L1_REFERENCE_FRACTION = 0.32
L1_ARTIFACT_EXPONENT = 2.0
# Wavelet families taken in turn by the shrinkage (``l1_wavelet``): Haar keeps edges, db4 smooth
# anatomy; alternating them approximates the sum of both l1 norms (docs/recon.md).
L1_WAVELETS = ("haar", "db4")
# Iteration caps; the stopping tolerances end most reconstructions earlier.
CG_SENSE_ITERS = 100
L1_WAVELET_ITERS = 100

# --------------------------------------------------------------------------- input checks


def _check_inputs(kspace: Tensor, maps: Tensor | None = None) -> None:
    if not isinstance(kspace, Tensor) or kspace.ndim != 4:
        shape = tuple(getattr(kspace, "shape", ()))
        raise ValueError(f"kspace must be a tensor (slices, coils, ky, kx), got shape {shape}")
    if not kspace.is_complex():
        raise ValueError(f"kspace must be complex, got dtype {kspace.dtype}")
    if not bool(torch.isfinite(torch.view_as_real(kspace)).all()):
        raise ValueError("k-space contains NaN or inf")
    if maps is not None and tuple(maps.shape) != tuple(kspace.shape):
        raise ValueError(f"maps shape {tuple(maps.shape)} does not match k-space shape {tuple(kspace.shape)}")


# --------------------------------------------------------------------------- direct methods


def zero_filled(kspace: Tensor, maps: Tensor) -> Tensor:
    """Coil-combined zero-filled image ``x = S^H F^H y`` ``(slices, ky, kx)``, complex."""
    _check_inputs(kspace, maps)
    return (maps.conj() * ifft2c(kspace)).sum(dim=-3)


def rss(kspace: Tensor) -> Tensor:
    """Root-sum-of-squares magnitude ``sqrt(sum_c |F^H y_c|^2)`` over the coil axis (-3), real."""
    if kspace.ndim < 3:
        raise ValueError(f"kspace must be (..., coils, ky, kx), got shape {tuple(kspace.shape)}")
    img = torch.view_as_real(ifft2c(kspace))
    return img.square().sum(dim=(-1, -4)).sqrt()


def data_scale(image: Tensor) -> Tensor:
    """Per-slice robust scale ``(slices, 1, 1)``: 99th percentile of ``|image|`` (1 if it is 0)."""
    mag = image.abs().flatten(1).float()
    q = torch.quantile(mag, 0.99, dim=1)
    q = torch.where(q > 0, q, mag.amax(dim=1))
    return torch.where(q > 0, q, torch.ones_like(q))[:, None, None]


def pixel_noise(
    kspace: Tensor, mask: Tensor | np.ndarray, scale: Tensor, noise_sigma: float | Tensor | None
) -> Tensor:
    """``sigma_zf`` per slice ``(slices, 1, 1)``: the noise of one pixel of the zero-filled image
    divided by ``scale`` (module docstring). ``noise_sigma`` None: estimated from the data."""
    sigma = _noise_sigma(kspace, mask, noise_sigma).reshape(-1, 1, 1)
    return sigma / scale.to(torch.float32) * sampled_fraction(kspace, mask).sqrt()


def _noise_sigma(kspace: Tensor, mask: Tensor | np.ndarray, noise_sigma: float | Tensor | None) -> Tensor:
    """The noise of one k-space sample per slice ``(slices,)``: given, or estimated from the data."""
    sigma = noise_level(kspace, mask) if noise_sigma is None else torch.as_tensor(noise_sigma)
    return sigma.to(device=kspace.device, dtype=torch.float32).flatten().expand(kspace.shape[0])


def sampled_fraction(kspace: Tensor, mask: Tensor | np.ndarray) -> Tensor:
    """The sampled share of k-space per slice ``(slices, 1, 1)``."""
    s, _, ky, kx = kspace.shape
    return as_mask(mask, s, ky, kx, device=kspace.device).mean(dim=(-3, -2, -1)).reshape(-1, 1, 1)


def cg_penalty(
    kspace: Tensor, mask: Tensor | np.ndarray, scale: Tensor, noise_sigma: float | Tensor | None
) -> Tensor:
    """CG-SENSE's Wiener penalty ``(slices, ky, kx)`` on the image's spatial frequencies:
    ``c sigma^2 / P(k)`` with ``c = CG_WIENER_WEIGHT (1 + sigma_zf / CG_WIENER_KNEE)``
    (dimensionless; ``scale`` as for :func:`pixel_noise`; docs/recon.md, "The weight rule")."""
    sigma = _noise_sigma(kspace, mask, noise_sigma)
    weight = CG_WIENER_WEIGHT * (1.0 + pixel_noise(kspace, mask, scale, sigma) / CG_WIENER_KNEE)
    return weight * sigma.reshape(-1, 1, 1) ** 2 / signal_spectrum(kspace, mask, sigma)


def l1_weight(sigma_zf: Tensor, fraction: Tensor) -> Tensor:
    """L1-wavelet's weight from the zero-filled pixel noise and the sampled fraction ``f``:
    ``c sigma^2 / (1 + sigma / knee) + floor (f / f_ref)^p`` (docs/recon.md, "The weight rule")."""
    noise_term = L1_NOISE_WEIGHT * sigma_zf**2 / (1.0 + sigma_zf / L1_NOISE_KNEE)
    return noise_term + L1_ARTIFACT_WEIGHT * (fraction / L1_REFERENCE_FRACTION) ** L1_ARTIFACT_EXPONENT


# --------------------------------------------------------------------------- CG


def conjugate_gradient(
    normal_op: Callable[[Tensor], Tensor],
    rhs: Tensor,
    *,
    iters: int = CG_SENSE_ITERS,
    tol: float = 1e-6,
    x0: Tensor | None = None,
    dims: tuple[int, ...] | None = None,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Solve ``N x = b`` for Hermitian positive (semi-)definite ``N`` by conjugate gradients.

    ``normal_op(x)`` applies ``N``; ``rhs`` is ``b``. ``dims``: the axes an inner product sums
    over; the remaining (leading) axes hold independent systems with their own step sizes
    (e.g. ``dims=(-2, -1)`` for one system per slice); None sums over everything (one system).
    ``preconditioner(r)`` applies a Hermitian positive definite ``M ~ N^-1`` (preconditioned CG).
    Stops after ``iters`` iterations or when every system has ``||r|| <= tol ||b||``; a system
    that gets there first stays at that iterate (so a slice's result does not depend on its batch).
    ``callback(iteration, x, residual_norm)`` is called after each iteration.
    """
    red = tuple(range(rhs.ndim)) if dims is None else tuple(d % rhs.ndim for d in dims)
    tiny = torch.finfo(rhs.real.dtype).tiny

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a.conj() * b).real.sum(dim=red, keepdim=True)

    def precondition(r: Tensor) -> Tensor:
        return r if preconditioner is None else preconditioner(r)

    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - normal_op(x) if x0 is not None else rhs.clone()
    z = precondition(r)
    p = z.clone()
    rz = dot(r, z)
    rr = rz if preconditioner is None else dot(r, r)
    stop = (tol**2) * dot(rhs, rhs)
    for it in range(iters):
        active = rr > stop  # a system that has converged stays where it stopped
        if not bool(active.any()):
            break
        ap = normal_op(p)
        pap = dot(p, ap)
        alpha = torch.where(active & (pap > 0), rz / pap.clamp_min(tiny), torch.zeros_like(pap))
        x = x + alpha * p
        r = r - alpha * ap
        z = precondition(r)
        rz_new = dot(r, z)
        rr = rz_new if preconditioner is None else dot(r, r)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        p = torch.where(active, z + beta * p, p)
        rz = rz_new
        if callback is not None:
            callback(it, x, rr.sqrt())
    return x


def cg_sense(
    kspace: Tensor,
    maps: Tensor,
    mask: Tensor | np.ndarray,
    *,
    lam: float | None = None,
    noise_sigma: float | Tensor | None = None,
    weight_scale: float = 1.0,
    iters: int = CG_SENSE_ITERS,
    tol: float = 1e-4,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """CG-SENSE: ``argmin_x ||A x - y||^2 + ||L x||^2`` via CG on ``(A^H A + L^H L) x = A^H y``.

    ``A = M F S`` (:class:`SenseOperator`). ``lam`` given: Tikhonov, ``L^H L = lam I`` (as sigpy
    ``SenseRecon`` and BART ``pics -l2``; ``lam`` refers to the per-slice normalised data, module
    docstring). None: the Wiener penalty ``L^H L = F^H diag(lam(k)) F`` of :func:`cg_penalty` per
    slice, from ``noise_sigma`` (the noise of one k-space sample; None: estimated from the data).
    ``weight_scale`` multiplies either (for sweeps). With unit-norm coil maps ``A^H A`` has
    eigenvalues in ``[0, 1]``. One CG system per slice, stopped at ``||r|| <= tol ||b||`` or
    ``iters``. ``callback(iteration, x)`` sees each iterate (in data units). Returns complex
    ``(slices, ky, kx)``.
    """
    _check_inputs(kspace, maps)
    if lam is not None and lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if not (weight_scale >= 0 and math.isfinite(weight_scale)):
        raise ValueError(f"weight_scale must be finite and >= 0, got {weight_scale}")
    op = SenseOperator(maps, mask)
    rhs = op.adjoint(kspace)
    scale = data_scale(rhs)
    rhs = rhs / scale
    preconditioner = None
    if lam is None:
        penalty = weight_scale * cg_penalty(kspace, mask, scale, noise_sigma)

        def normal(v: Tensor) -> Tensor:
            return op.normal(v) + ifft2c(penalty * fft2c(v))

        # A^H A has eigenvalues in [0, 1] and the penalty is diagonal in Fourier: dividing each
        # frequency by 1 + penalty evens out the penalty's range (half the iterations or fewer).
        inverse = 1.0 / (1.0 + penalty)

        def preconditioner(v: Tensor) -> Tensor:
            return ifft2c(fft2c(v) * inverse)

    else:
        weight = weight_scale * lam

        def normal(v: Tensor) -> Tensor:
            return op.normal(v) + weight * v

    cb = None if callback is None else (lambda it, v, _res: callback(it, v * scale))
    x = conjugate_gradient(
        normal, rhs, iters=iters, tol=tol, dims=(-2, -1), preconditioner=preconditioner, callback=cb
    )
    return x * scale


def _max_eig(normal: Callable[[Tensor], Tensor], like: Tensor, *, iters: int = 15, seed: int = 0) -> float:
    """Largest eigenvalue of a Hermitian PSD operator by power iteration (for the FISTA step)."""
    gen = torch.Generator(device=like.device).manual_seed(seed)
    v = torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)
    eig = 1.0
    for _ in range(iters):
        w = normal(v)
        eig = float(torch.linalg.vector_norm(w) / torch.linalg.vector_norm(v).clamp_min(1e-30))
        v = w / torch.linalg.vector_norm(w).clamp_min(1e-30)
    return eig


def _shifted_shrinkage(
    v: Tensor, family: str, levels: int, shift: tuple[int, ...], threshold: float | Tensor
) -> Tensor:
    """Soft-threshold the detail bands of ``v`` circularly shifted by ``shift``, shifted back."""
    v = torch.roll(v, shifts=shift, dims=(-2, -1))
    a, details = wavelet_forward(v, wavelet=family, levels=levels)
    out = wavelet_inverse(a, [soft_threshold(d, threshold) for d in details], wavelet=family)
    return torch.roll(out, shifts=tuple(-s for s in shift), dims=(-2, -1))


# --------------------------------------------------------------------------- L1-wavelet


def l1_wavelet(
    kspace: Tensor,
    maps: Tensor,
    mask: Tensor | np.ndarray,
    *,
    lam: float | None = None,
    noise_sigma: float | Tensor | None = None,
    iters: int = L1_WAVELET_ITERS,
    tol: float = 2e-3,
    wavelet: str | tuple[str, ...] = L1_WAVELETS,
    levels: int = 4,
    random_shift: bool = True,
    seed: int = 0,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """L1-wavelet CS: ``argmin_x 1/2 ||A x - y||^2 + lam ||Psi_d x||_1`` by FISTA.

    ``Psi`` is the orthogonal periodic 2-D DWT (:func:`wavelet_forward`); ``Psi_d`` its detail
    bands (the coarse approximation is not penalised); complex coefficients are shrunk in
    magnitude. ``wavelet``: one family, or several taken in turn (one per iteration; the default
    alternates Haar and db4, which approximates the sum of both l1 norms). Step ``1/L`` with ``L``
    the largest eigenvalue of ``A^H A`` (power iteration).
    ``lam`` refers to the per-slice normalised data (module docstring); None: the weight rule
    :func:`l1_weight` per slice from ``noise_sigma`` (None: estimated from the data).
    Starts from the zero-filled image; stops when ``||x_k+1 - x_k|| <= tol ||x_k+1||`` or after
    ``iters``. ``random_shift``: cycle spinning, a random circular shift of the image
    (0 .. 2^levels - 1 pixels per axis, drawn from ``seed``) before each wavelet shrinkage, as
    BART ``pics`` does; it removes the blocky shift-variance artefacts of the decimated DWT.
    ``callback(iteration, x)`` sees each iterate (in data units). Returns complex
    ``(slices, ky, kx)``.
    """
    _check_inputs(kspace, maps)
    if lam is not None and lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    families = (wavelet,) if isinstance(wavelet, str) else tuple(wavelet)
    if not families:
        raise ValueError("wavelet: need at least one family, got an empty tuple")
    op = SenseOperator(maps, mask)
    aty = op.adjoint(kspace)
    scale = data_scale(aty)
    if lam is None:
        sigma_zf = pixel_noise(kspace, mask, scale, noise_sigma)
        weight: float | Tensor = l1_weight(sigma_zf, sampled_fraction(kspace, mask))
    else:
        weight = lam
    aty = aty / scale
    step = 1.0 / max(_max_eig(op.normal, aty) * 1.01, 1e-12)
    # Per-slice thresholds broadcast over the detail bands (slices, 3, h, w).
    threshold = weight[..., None] * step if isinstance(weight, Tensor) else weight * step

    gen = torch.Generator().manual_seed(seed)
    period = 2**levels

    def prox(v: Tensor, it: int) -> Tensor:
        # Cycle spinning (see docstring); the generator lives on the CPU whatever the device.
        shift = (
            tuple(int(s) for s in torch.randint(0, period, (2,), generator=gen)) if random_shift else (0, 0)
        )
        return _shifted_shrinkage(v, families[it % len(families)], levels, shift, threshold)

    # Pixels where every coil map is zero (ESPIRiT crop) are in the null space of A: keep them at
    # zero, or the shifted shrinkage slowly leaks energy into them.
    support = (maps.abs().sum(dim=-3) > 0).to(aty.real.dtype)
    x = aty.clone()
    z = x
    t = 1.0
    for it in range(iters):
        x_new = prox(z - step * (op.normal(z) - aty), it) * support
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        z = x_new + ((t - 1.0) / t_new) * (x_new - x)
        change = float(torch.linalg.vector_norm(x_new - x) / torch.linalg.vector_norm(x_new).clamp_min(1e-30))
        x, t = x_new, t_new
        if callback is not None:
            callback(it, x * scale)
        if change <= tol:
            break
    return x * scale
