"""Noise pre-whitening from a noise scan: covariance -> Cholesky -> whitening matrix.

Model: the receiver noise ``n`` (one complex sample per coil) has covariance
``Psi = E[n n^H]``. With ``Psi = L L^H`` (Cholesky), ``W = L^-1`` makes ``W n`` white:
``E[(W n)(W n)^H] = I``. Pre-whitening multiplies every k-space sample's coil vector by ``W``
(before coil maps, masks, or any reconstruction), so the data term of every solver is the
maximum-likelihood one.

Scaling convention: ``Psi`` is estimated per sample of the noise scan,
``Psi = noise noise^H / samples`` (zero-mean noise assumed, no mean subtracted), so whitened
noise has unit variance per complex sample (``E|n_w|^2 = 1``) *at the noise scan's own sampling
bandwidth*. No receiver-bandwidth correction is applied here: when the noise scan's dwell time
differs from the imaging scan's, the assembler has already scaled the noise samples by
``sqrt(dwell_noise / dwell_imaging)`` (noise variance per sample goes with the bandwidth,
1/dwell), so the whitened imaging noise has unit variance.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from recon_server.recon.sense import as_mask

__all__ = ["noise_covariance", "noise_level", "prewhiten", "whitening_matrix"]

_CONDITION_LIMIT = 1e10  # max/min eigenvalue ratio beyond which the covariance counts as singular


def noise_covariance(noise: Tensor) -> Tensor:
    """``Psi = noise noise^H / samples`` in complex128 from ``noise`` ``(coils, samples)``."""
    if not isinstance(noise, Tensor) or noise.ndim != 2:
        shape = tuple(getattr(noise, "shape", ()))
        raise ValueError(f"noise must be a tensor (coils, samples), got shape {shape}")
    coils, samples = noise.shape
    if samples < coils:
        raise ValueError(
            f"noise scan has {samples} samples for {coils} coils: the covariance would be singular"
        )
    n = noise.to(torch.complex128)
    if not bool(torch.isfinite(torch.view_as_real(n)).all()):
        raise ValueError("noise samples contain NaN or inf")
    return (n @ n.mH) / samples


def whitening_matrix(noise: Tensor) -> Tensor:
    """Whitening matrix ``W = inv(chol(Psi))`` ``(coils, coils)`` complex64 from a noise scan.

    ``noise``: complex ``(coils, samples)``. ``W`` is lower triangular; ``W Psi W^H = I``.
    Raises ValueError if the covariance is not finite or is singular (a dead or duplicated
    channel: condition number above 1e10, or Cholesky fails).
    """
    cov = noise_covariance(noise)
    evals = torch.linalg.eigvalsh(cov)
    top = float(evals[-1])
    if not top > 0:
        raise ValueError("noise covariance is singular: the noise scan is all zero")
    if float(evals[0]) <= top / _CONDITION_LIMIT:
        raise ValueError(
            f"noise covariance is singular: eigenvalues span {float(evals[0]):.3g}..{top:.3g} "
            "(a dead or duplicated receiver channel?)"
        )
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        raise ValueError("noise covariance is singular: Cholesky factorisation failed")
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    w = torch.linalg.solve_triangular(chol, eye, upper=False)
    return w.to(torch.complex64)


def prewhiten(kspace: Tensor, whitening: Tensor) -> Tensor:
    """Apply ``W`` over the coil axis (-3) of ``kspace`` ``(..., coils, ky, kx)``.

    ``y_w[..., c, :, :] = sum_d W[c, d] y[..., d, :, :]``. Output dtype follows ``kspace``;
    ``W`` is moved to its device. Raises ValueError on shape mismatch or NaN/inf k-space.
    """
    if kspace.ndim < 3:
        raise ValueError(f"kspace must be (..., coils, ky, kx), got shape {tuple(kspace.shape)}")
    coils = kspace.shape[-3]
    if whitening.shape != (coils, coils):
        raise ValueError(
            f"whitening matrix shape {tuple(whitening.shape)} does not match {coils} coils of k-space"
        )
    if not bool(torch.isfinite(torch.view_as_real(kspace.to(torch.complex64))).all()):
        raise ValueError("k-space contains NaN or inf")
    w = whitening.to(device=kspace.device, dtype=kspace.dtype if kspace.is_complex() else torch.complex64)
    return torch.einsum("cd,...dyx->...cyx", w, kspace.to(w.dtype))


#: The k-space periphery used by :func:`noise_level`: samples beyond this fraction of the
#: maximum frequency along both axes (the corners), where an image's signal is far below noise.
PERIPHERY = 0.8
#: Fewer measured corner samples than this: the outer band along the readout is used instead.
MIN_PERIPHERY_SAMPLES = 2048
#: The share of image columns (readout positions) taken as background by the column estimate:
#: the quietest ones, where a head in its field of view leaves only air.
BACKGROUND_COLUMNS = 0.125
#: Fewer fully measured readout lines than this: no column estimate.
MIN_FULL_LINES = 8


def noise_level(kspace: Tensor, mask: Tensor | np.ndarray) -> Tensor:
    """Per-slice noise standard deviation ``(slices,)`` of one complex k-space sample, from the data.

    For scans without a noise measurement. Two estimates, each of which signal can only lift,
    and the smaller is taken: the k-space corners (:func:`_corner_level`) and the background
    columns of the image (:func:`_background_column_level`, the readout positions outside the
    object, from the fully measured readout lines). ``|n|^2`` of complex Gaussian noise is
    exponential with median ``sigma^2 ln 2``, so each is ``sqrt(median |y|^2 / ln 2)`` (the
    median ignores the few samples where signal remains). Measured on Colin27 and simulator
    slices, 12 coils, R 2-6, SNR 4-80 (p99 / sigma): corners 0.99-1.31x the true sigma (the
    sharp synthetic FLAIR's own signal in the corners), columns 0.985-0.997x (docs/recon.md).
    ``kspace`` ``(slices, coils, ky, kx)``; ``mask`` as :func:`recon_server.recon.sense.as_mask`
    takes it. ValueError when neither region was measured.
    """
    s, _, ky, kx = kspace.shape
    m = as_mask(mask, s, ky, kx, device=kspace.device)[:, 0] > 0  # (slices or 1, ky, kx)
    estimates = [e for e in (_corner_level(kspace, m), _background_column_level(kspace, m)) if e is not None]
    if not estimates:
        raise ValueError(
            "no measured k-space sample in the periphery and no fully measured readout line: "
            "cannot estimate the noise level"
        )
    return torch.stack(estimates).amin(dim=0)


def _exponential_sigma(power: list[Tensor]) -> Tensor:
    """``sqrt(median / ln 2)`` of each slice's noise powers ``|n|^2`` (exponential variables)."""
    return torch.sqrt(torch.stack([p.median() for p in power]).to(torch.float32) / math.log(2))


def _corner_level(kspace: Tensor, m: Tensor) -> Tensor | None:
    """The corners of the measured k-space (beyond :data:`PERIPHERY` of the maximum frequency in
    both ky and kx; the outer readout band when few corner samples were measured)."""
    s, coils, ky, kx = kspace.shape
    fy = (torch.arange(ky, device=kspace.device) - ky // 2).abs() / (ky / 2)
    fx = (torch.arange(kx, device=kspace.device) - kx // 2).abs() / (kx / 2)
    corners = (fy[:, None] > PERIPHERY) & (fx[None, :] > PERIPHERY)
    region = m & corners
    if int(region[0].sum()) * coils < MIN_PERIPHERY_SAMPLES:
        region = m & (fx[None, :] > PERIPHERY)  # e.g. few measured outer lines
    if not bool(region.any()):
        return None
    power = kspace.abs().square()  # (slices, coils, ky, kx)
    region = region.expand(s, ky, kx)
    return _exponential_sigma([power[i][:, region[i]] for i in range(s)])


def _background_column_level(kspace: Tensor, m: Tensor) -> Tensor | None:
    """The image's quietest columns: each fully measured readout line is Fourier transformed along
    the readout (a unitary transform keeps the noise's variance), and the share
    :data:`BACKGROUND_COLUMNS` of readout positions with the least median power (smoothed over 5
    neighbours) is taken as background. None when a slice has fewer than :data:`MIN_FULL_LINES`
    fully measured lines. Unlike the corners, this does not depend on how much fine detail the
    image has."""
    s, coils, ky, kx = kspace.shape
    quiet_count = max(4, int(kx * BACKGROUND_COLUMNS))
    power = []
    for i in range(s):
        full = m[min(i, m.shape[0] - 1)].all(dim=-1)  # (ky,)
        if int(full.sum()) < MIN_FULL_LINES:
            return None
        # No centring shifts: they change the phase and the circular order of the columns, and
        # neither the powers nor the circular smoothing and selection below see either.
        hybrid = torch.fft.ifft(kspace[i][:, full, :], dim=-1, norm="ortho")
        column_power = hybrid.abs().square()  # (coils, lines, kx)
        profile = column_power.permute(2, 0, 1).reshape(kx, -1).median(dim=1).values
        smooth = torch.stack([torch.roll(profile, shift) for shift in range(-2, 3)]).mean(dim=0)
        quiet = torch.argsort(smooth)[:quiet_count]
        power.append(column_power[:, :, quiet])
    return _exponential_sigma(power)
