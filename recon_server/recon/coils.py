"""Coil sensitivity maps from the fully sampled calibration (ACS) region: ESPIRiT and Inati.

ESPIRiT (Uecker et al., MRM 71:990, 2014), one set of maps, as BART ``ecalib -m1`` and sigpy
``EspiritCalib`` compute it, in torch so it runs batched on the CPU or a GPU:

1. Calibration matrix: every ``k x k`` patch of the calibration k-space, all coils, is one row
   (``(patches, coils k^2)``, built with ``Tensor.unfold``).
2. Its right singular vectors with ``sigma > threshold * sigma_max`` span the signal subspace;
   we take them from ``eigh`` of the Gram matrix ``M^H M`` (``lambda = sigma^2``), which is
   cheaper than an SVD and batches over slices.
3. Per pixel ``r`` the ``C x C`` matrix ``G(r) = (N / k^2) sum_n k_n(r) k_n(r)^H``, with
   ``k_n = F^-1`` of kernel ``n`` (the conjugated singular vector, zero-padded to the image).
   ``G`` is band-limited (its k-space support is ``(2k-1)^2``), so it is computed exactly on a
   ``2k x 2k`` grid and brought to the image size by Fourier interpolation: ``C(C+1)/2`` FFTs
   instead of one per kernel and coil.
4. Maps = the dominant eigenvector of ``G(r)``: batched ``eigh`` on a coarse grid, bilinear
   up-sampling as the starting point, then ``power_iters`` power iterations at full size.
   The eigenvalue (~1 where the data are consistent) crops the maps: ``S(r) = 0`` where
   ``lambda(r) <= crop``. Phase is taken relative to the first coil (as sigpy/BART do),
   ``sum_c |S_c(r)|^2 = 1`` inside the crop.

Inati (Inati, Hansen, Kellman, ISMRM 2014 "A fast optimal method for coil sensitivity
estimation and adaptive coil combination"): the cheap fallback; power iterations on the locally
smoothed coil covariance of the low-resolution calibration images, without forming it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import Tensor

from recon_server.recon.fft import fft2c, ifft2c

__all__ = ["calibration_region", "espirit_maps", "inati_maps"]

DEFAULT_CALIB_COLS = 24  # BART ecalib -r 24 / sigpy calib_width=24 / utcsilab training data


def calibration_region(kspace: Tensor, acs: tuple[int, int], *, max_cols: int | None = None) -> Tensor:
    """Cut the centred calibration block ``(slices, coils, acs_rows, cols)`` out of k-space.

    ``acs = (start, stop)`` are the fully sampled phase-encode rows (stop exclusive, e.g. from
    :func:`recon_server.recon.masks.acs_region`). The readout is fully sampled, so any number of
    central columns may be used: ``max_cols`` of them (centred on ``kx // 2``); None picks
    ``max(24, acs_rows)`` (24 is BART/sigpy's default calibration width; a square-ish block when
    the ACS is taller), capped at ``kx``. Returns a copy.
    """
    if kspace.ndim != 4:
        raise ValueError(f"kspace must be (slices, coils, ky, kx), got shape {tuple(kspace.shape)}")
    ky, kx = kspace.shape[-2:]
    start, stop = int(acs[0]), int(acs[1])
    if not 0 <= start < stop <= ky:
        raise ValueError(f"ACS rows {acs} outside the {ky} phase-encode lines")
    rows = stop - start
    cols = max(DEFAULT_CALIB_COLS, rows) if max_cols is None else int(max_cols)
    if cols < 1:
        raise ValueError(f"max_cols must be positive, got {max_cols}")
    cols = min(cols, kx)
    c0 = kx // 2 - cols // 2
    return kspace[..., start:stop, c0 : c0 + cols].clone()


def _central_cols(calibration: Tensor, max_cols: int | None) -> Tensor:
    """Keep at most ``max_cols`` central columns (None: ``max(24, rows)``, the
    :func:`calibration_region` rule), so a full-readout-width calibration costs no more."""
    rows, cols = calibration.shape[-2:]
    keep = max(DEFAULT_CALIB_COLS, rows) if max_cols is None else int(max_cols)
    if keep >= cols:
        return calibration
    c0 = cols // 2 - keep // 2
    return calibration[..., c0 : c0 + keep]


def _check_calibration(calibration: Tensor, image_shape: tuple[int, int], kernel_size: int) -> None:
    if not isinstance(calibration, Tensor) or calibration.ndim != 4:
        shape = tuple(getattr(calibration, "shape", ()))
        raise ValueError(f"calibration must be a tensor (slices, coils, rows, cols), got shape {shape}")
    if not calibration.is_complex():
        raise ValueError(f"calibration must be complex, got dtype {calibration.dtype}")
    if len(image_shape) != 2 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (ky, kx), got {image_shape}")
    rows, cols = calibration.shape[-2:]
    if rows < kernel_size or cols < kernel_size:
        raise ValueError(
            f"calibration region {rows}x{cols} is smaller than the ESPIRiT kernel {kernel_size}x{kernel_size}"
        )
    if rows > image_shape[0] or cols > image_shape[1]:
        raise ValueError(f"calibration region {rows}x{cols} is larger than the image {image_shape}")
    if not bool(torch.isfinite(torch.view_as_real(calibration)).all()):
        raise ValueError("calibration data contain NaN or inf")
    energy = calibration.abs().pow(2).sum(dim=(-3, -2, -1))
    if bool((energy == 0).any()):
        raise ValueError("calibration data are all zero in at least one slice (no ACS signal)")


def _centre_pad(x: Tensor, shape: tuple[int, int]) -> Tensor:
    """Zero-pad the last two axes to ``shape`` keeping index ``n // 2`` at ``N // 2``."""
    ny, nx = x.shape[-2:]
    top, left = shape[0] // 2 - ny // 2, shape[1] // 2 - nx // 2
    return F.pad(x, (left, shape[1] - nx - left, top, shape[0] - ny - top))


def _fourier_resize_matrices(gram: Tensor, shape: tuple[int, int]) -> Tensor:
    """Band-limited interpolation of ``G`` ``(s, C, C, m, m)`` to ``shape`` -> ``(s, y*x, C, C)``.

    Equivalent to ``ifft2c(zero_pad(fft2c(G))) * sqrt(y x / m^2)`` (values preserved), but the
    small spectrum goes straight into FFT-native order with the output ``fftshift`` folded in as
    a phase ramp, and the one large transform runs over axes (1, 2) of the final
    ``(s, y, x, C, C)`` layout: no ``roll`` or transpose of the large array.
    """
    s, c, _, my, mx = gram.shape
    ny, nx = shape
    fy = torch.arange(my, device=gram.device) - my // 2
    fx = torch.arange(mx, device=gram.device) - mx // 2
    ramp_y = torch.exp(-2j * math.pi * fy * (ny // 2) / ny).to(gram.dtype)
    ramp_x = torch.exp(-2j * math.pi * fx * (nx // 2) / nx).to(gram.dtype)
    spec = fft2c(gram) * (ramp_y[:, None] * ramp_x[None, :] / math.sqrt(my * mx))
    big = gram.new_zeros(s, ny, nx, c, c)
    big[:, (fy % ny)[:, None], (fx % nx)[None, :]] = spec.permute(0, 3, 4, 1, 2)
    return torch.fft.ifft2(big, dim=(1, 2), norm="forward").reshape(s, ny * nx, c, c)


def _espirit_gram_lowres(calibration: Tensor, kernel_size: int, threshold: float) -> Tensor:
    """``G`` ``(slices, C, C, 2k, 2k)`` on the ``2k x 2k`` grid (step 1-3 of the module docstring)."""
    s, c, _, _ = calibration.shape
    k = kernel_size
    # 1. calibration matrix, rows = patches, columns = (coil, ky, kx) of the patch.
    patches = calibration.unfold(2, k, 1).unfold(3, k, 1)  # (s, c, py, px, k, k)
    mat = patches.permute(0, 2, 3, 1, 4, 5).reshape(s, -1, c * k * k)
    # 2. signal subspace from the Gram matrix (eigenvalues ascending).
    evals, evecs = torch.linalg.eigh(mat.mH @ mat)
    keep = evals > (threshold**2) * evals[..., -1:]
    n = int(keep.sum(dim=-1).max())
    weights = keep[..., -n:].to(evals.dtype)  # (s, n)
    kernels = evecs[..., -n:].conj().mT.reshape(s, n, c, k, k)
    # 3. G on the 2k grid: kernel images, outer products summed over kernels.
    m = 2 * k
    img = ifft2c(_centre_pad(kernels, (m, m)))  # (s, n, c, m, m)
    wimg = img * weights[:, :, None, None, None]
    return torch.einsum("sncyx,sndyx->scdyx", wimg, img.conj()) * (m * m / (k * k))


def _coil_norm(v: Tensor) -> Tensor:
    """Euclidean norm over the last (coil) axis, keepdim; real arithmetic (complex norm is slow on CPU)."""
    return torch.view_as_real(v).square().sum(dim=(-1, -2)).sqrt().unsqueeze(-1)


def _phase_to_first_coil(v: Tensor, dim: int) -> Tensor:
    ref = v.select(dim, 0).unsqueeze(dim)
    mag = ref.abs()
    unit = ref.conj() / mag.clamp_min(torch.finfo(mag.dtype).tiny)
    phase = torch.where(mag > 0, unit, torch.ones_like(ref))
    return v * phase


def _espirit_chunk(
    calibration: Tensor,
    image_shape: tuple[int, int],
    kernel_size: int,
    threshold: float,
    crop: float,
    power_iters: int,
    coarse: int,
) -> Tensor:
    s, c = calibration.shape[:2]
    ny, nx = image_shape
    gram = _espirit_gram_lowres(calibration, kernel_size, threshold)
    # 4a. dominant eigenvector on a coarse grid (exact eigh), as the starting point.
    cy, cx = min(ny, coarse), min(nx, coarse)
    _, vecs = torch.linalg.eigh(_fourier_resize_matrices(gram, (cy, cx)))
    v = _phase_to_first_coil(vecs[..., -1], dim=-1).reshape(s, cy, cx, c)
    if (cy, cx) != (ny, nx):
        vr = torch.view_as_real(v).permute(0, 3, 4, 1, 2).reshape(s, 2 * c, cy, cx)
        vr = F.interpolate(vr, size=(ny, nx), mode="bilinear", align_corners=False)
        v = torch.view_as_complex(vr.reshape(s, c, 2, ny, nx).permute(0, 3, 4, 1, 2).contiguous())
    # 4b. power iterations on the full-size matrices.
    g = _fourier_resize_matrices(gram, (ny, nx))
    v = v.reshape(s, ny * nx, c)
    v = v / _coil_norm(v).clamp_min(1e-30)
    eig = torch.zeros(s, ny * nx, 1, dtype=g.real.dtype, device=g.device)
    for _ in range(max(1, power_iters)):
        w = (g @ v.unsqueeze(-1)).squeeze(-1)
        eig = _coil_norm(w)
        v = w / eig.clamp_min(1e-30)
    maps = _phase_to_first_coil(v, dim=-1) * (eig > crop)
    return maps.reshape(s, ny, nx, c).permute(0, 3, 1, 2).contiguous()


def auto_kernel_size(rows: int) -> int:
    """ESPIRiT kernel width for a calibration of ``rows`` lines: 6, smaller when rows are few.

    The kernel must slide over the calibration region in enough positions (``rows - k + 1 >= k + 2``)
    for the signal subspace to be well estimated; with fastMRI's 4% centre at R >= 5 (10 of 256
    lines) a 6x6 kernel leaves 5 positions, the eigenvalues sag below the crop and the maps get
    holes (CG-SENSE NRMSE 0.72 at R=5 on a held-out FLAIR slice; 0.15 with k = 4).
    """
    return max(3, min(6, (rows - 1) // 2))


def espirit_maps(
    calibration: Tensor,
    image_shape: tuple[int, int],
    *,
    kernel_size: int | None = None,
    threshold: float = 0.02,
    crop: float = 0.95,
    power_iters: int = 4,
    coarse: int = 64,
    max_calib_cols: int | None = None,
    max_chunk_bytes: int = 1 << 30,
) -> Tensor:
    """One set of ESPIRiT maps ``(slices, coils, ky, kx)`` from calibration k-space.

    ``calibration``: complex ``(slices, coils, rows, cols)`` fully sampled centre of k-space
    (see :func:`calibration_region`); its size sets the calibration size. ``image_shape``:
    ``(ky, kx)`` of the maps. ``kernel_size`` (k), ``threshold`` (singular values kept above
    ``threshold * sigma_max``) and ``crop`` (eigenvalue cut) as in BART ``ecalib -m1 -k -t -c``;
    ``kernel_size=None`` picks :func:`auto_kernel_size` from the calibration rows.
    ``coarse`` is the grid of the exact ``eigh`` starting point, ``power_iters`` the full-size
    refinement steps. A calibration wider than ``max_calib_cols`` (None: ``max(24, rows)``) is cut
    to its central columns (the readout is fully sampled, so the full ``kx`` width may be
    passed). Slices are processed in chunks whose ``(ky*kx, C, C)`` matrices fit in
    ``max_chunk_bytes``. Runs on the device of ``calibration``; complex64 output.
    """
    image_shape = (int(image_shape[0]), int(image_shape[1]))
    if kernel_size is None:
        kernel_size = auto_kernel_size(int(calibration.shape[-2]) if calibration.ndim == 4 else 0)
    _check_calibration(calibration, image_shape, kernel_size)
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    calib = _central_cols(calibration, max_calib_cols).to(torch.complex64)
    s, c = calib.shape[:2]
    per_slice = 8 * c * c * image_shape[0] * image_shape[1] * 2  # matrices + FFT temporaries
    chunk = max(1, min(s, max_chunk_bytes // max(per_slice, 1)))
    out = [
        _espirit_chunk(calib[i : i + chunk], image_shape, kernel_size, threshold, crop, power_iters, coarse)
        for i in range(0, s, chunk)
    ]
    return torch.cat(out, dim=0)


def _box_smooth(x: Tensor, width: int) -> Tensor:
    """Separable moving average over the last two axes (complex, zero padded, 'same' size)."""
    if width <= 1:
        return x
    lead = x.shape[:-2]
    xr = torch.view_as_real(x).movedim(-1, -3).reshape(-1, 1, *x.shape[-2:])
    ker = torch.ones(1, 1, width, 1, dtype=xr.dtype, device=xr.device) / width
    pad = width // 2
    xr = F.conv2d(F.pad(xr, (0, 0, pad, width - 1 - pad)), ker)
    xr = F.conv2d(F.pad(xr, (pad, width - 1 - pad, 0, 0)), ker.mT)
    xr = xr.reshape(*lead, 2, *x.shape[-2:]).movedim(-3, -1).contiguous()
    return torch.view_as_complex(xr)


def inati_maps(
    calibration: Tensor,
    image_shape: tuple[int, int],
    *,
    smoothing: int = 5,
    iters: int = 5,
    threshold: float = 0.0,
    max_calib_cols: int | None = None,
) -> Tensor:
    """Inati coil maps ``(slices, coils, ky, kx)`` from calibration k-space (cheap fallback).

    Low-resolution coil images ``D`` come from the calibration zero-padded to ``image_shape``
    (Hann-windowed against ringing). Starting from the coil-summed phase, ``iters`` times:
    ``rho = sum_c conj(v_c) D_c``; ``v = smooth(D conj(rho))`` normalised per pixel (a power
    iteration on the ``smoothing x smoothing`` local covariance, never formed). Maps are the
    unit-norm ``v`` with phase relative to the first coil; pixels whose smoothed energy is below
    ``threshold`` times its maximum are zeroed (0 keeps everything, like BART ``caldir``).
    ``max_calib_cols`` as in :func:`espirit_maps`.
    """
    image_shape = (int(image_shape[0]), int(image_shape[1]))
    _check_calibration(calibration, image_shape, 1)
    calib = _central_cols(calibration, max_calib_cols).to(torch.complex64)
    rows, cols = calib.shape[-2:]
    win = torch.outer(
        torch.hann_window(rows + 2, periodic=False, device=calib.device)[1:-1],
        torch.hann_window(cols + 2, periodic=False, device=calib.device)[1:-1],
    )
    images = ifft2c(_centre_pad(calib * win, image_shape))  # (s, c, y, x)
    v = _box_smooth(images, smoothing)
    v = v.sum(dim=(-2, -1), keepdim=True).expand_as(images).clone()
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    for _ in range(max(1, iters)):
        rho = (v.conj() * images).sum(dim=1, keepdim=True)
        v = _box_smooth(images * rho.conj(), smoothing)
        norm = v.norm(dim=1, keepdim=True)
        v = v / norm.clamp_min(1e-30)
    v = _phase_to_first_coil(v, dim=1)
    if threshold > 0:
        energy = norm[:, 0]
        keep = energy > threshold * energy.amax(dim=(-2, -1), keepdim=True)
        v = v * keep[:, None]
    return v
