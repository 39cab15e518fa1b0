"""Orthogonal periodic 2-D wavelet transforms and complex soft thresholding (L1-wavelet's ``Psi``).

:func:`wavelet_forward` / :func:`wavelet_inverse` run on PyWavelets on the CPU (``periodization``
of the input rolled by ``L/2 - 1``, the same coefficients) and on torch convolutions on CUDA or
under autograd (:func:`conv_wavelet_forward` / :func:`conv_wavelet_inverse`); measured in
benchmarks/bench_handwritten.py.
"""

from __future__ import annotations

import numpy as np
import pywt
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import Tensor

__all__ = [
    "WAVELETS",
    "conv_wavelet_forward",
    "conv_wavelet_inverse",
    "soft_threshold",
    "wavelet_forward",
    "wavelet_inverse",
]

# Orthogonal wavelet decomposition low-pass filters (Daubechies, pywt's ``dec_lo`` order).
WAVELETS: dict[str, tuple[float, ...]] = {
    "haar": (0.7071067811865476, 0.7071067811865476),
    "db2": (-0.12940952255126037, 0.2241438680420134, 0.8365163037378079, 0.48296291314453416),
    "db4": (
        -0.010597401785069032,
        0.0328830116668852,
        0.030841381835560764,
        -0.18703481171909309,
        -0.027983769416859854,
        0.6308807679298589,
        0.7148465705529157,
        0.2303778133088965,
    ),
}


def _filters(name: str, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Analysis filters as conv2d weights: along columns ``(2, 1, 1, L)``, along rows ``(2, 1, L, 1)``.

    Correlation form: ``low[k] = sum_n h[n] x[2k + n]`` with ``h`` the reversed decomposition
    low-pass, ``g[n] = (-1)^n h[L-1-n]`` the matching high-pass (an orthogonal QMF pair).
    """
    if name not in WAVELETS:
        raise ValueError(f"unknown wavelet {name!r}; known: {sorted(WAVELETS)}")
    h = torch.tensor(WAVELETS[name][::-1], dtype=torch.float64)
    sign = torch.tensor([(-1.0) ** n for n in range(h.numel())], dtype=torch.float64)
    pair = torch.stack([h, sign * h.flip(0)]).to(device=device, dtype=dtype)  # (2, L)
    return pair[:, None, None, :], pair[:, None, :, None]


def _dwt2_level(x: Tensor, w_cols: Tensor, w_rows: Tensor) -> Tensor:
    """One periodic level of real ``(B, 1, H, W)`` -> ``(B, 4, H/2, W/2)``; band 0 = approximation.

    Band index ``2 bw + bh``: ``bw``/``bh`` = low(0)/high(1) filter along columns/rows.
    """
    taps = w_cols.shape[-1]
    b, _, h, w = x.shape
    cols = F.conv2d(F.pad(x, (0, taps - 2, 0, 0), mode="circular"), w_cols, stride=(1, 2))
    cols = cols.reshape(b * 2, 1, h, w // 2)
    both = F.conv2d(F.pad(cols, (0, 0, 0, taps - 2), mode="circular"), w_rows, stride=(2, 1))
    return both.reshape(b, 4, h // 2, w // 2)


def _idwt2_level(c: Tensor, w_cols: Tensor, w_rows: Tensor) -> Tensor:
    """Adjoint (= inverse) of :func:`_dwt2_level`: transposed convolutions, then wrap the tail."""
    taps = w_cols.shape[-1]
    b, _, h2, w2 = c.shape
    h, w = 2 * h2, 2 * w2
    rows = F.conv_transpose2d(c.reshape(b * 2, 2, h2, w2), w_rows, stride=(2, 1))  # (2b, 1, h+L-2, w2)
    rows = torch.cat([rows[:, :, : taps - 2] + rows[:, :, h:], rows[:, :, taps - 2 : h]], dim=2)
    cols = F.conv_transpose2d(rows.reshape(b, 2, h, w2), w_cols, stride=(1, 2))  # (b, 1, h, w+L-2)
    return torch.cat([cols[..., : taps - 2] + cols[..., w:], cols[..., taps - 2 : w]], dim=3)


def _levels(shape: tuple[int, int], levels: int, taps: int) -> int:
    ny, nx = shape
    done = 0
    while done < levels and ny % 2 == 0 and nx % 2 == 0 and min(ny, nx) >= max(taps, 4):
        ny, nx, done = ny // 2, nx // 2, done + 1
    return done


def _to_planes(x: Tensor) -> Tensor:
    """``(..., H, W)`` real/complex -> real ``(B, 1, H, W)`` (complex: re/im as separate planes)."""
    planes = torch.view_as_real(x).movedim(-1, -3) if x.is_complex() else x
    return planes.reshape(-1, 1, x.shape[-2], x.shape[-1])


def _from_planes(y: Tensor, lead: tuple[int, ...], complex_: bool) -> Tensor:
    """Inverse of :func:`_to_planes` for ``(B, K, h, w)`` -> ``(..., K, h, w)`` (K kept)."""
    k, h, w = y.shape[1:]
    if not complex_:
        return y.reshape(*lead, k, h, w)
    return torch.view_as_complex(y.reshape(*lead, 2, k, h, w).movedim(-4, -1).contiguous())


def _on_pywavelets(x: Tensor) -> bool:
    """CPU tensors outside autograd go to PyWavelets (~3x faster there: benchmarks/bench_handwritten.py);
    CUDA tensors stay on the device with the convolutions (:func:`conv_wavelet_forward`)."""
    return x.device.type == "cpu" and not x.requires_grad


def _shift(wavelet: str) -> int:
    """Our periodic DWT is PyWavelets' ``periodization`` of the input rolled by ``L/2 - 1``."""
    return len(WAVELETS[wavelet]) // 2 - 1


def _pywt_forward(x: Tensor, wavelet: str, levels: int) -> tuple[Tensor, list[Tensor]]:
    shift, a = _shift(wavelet), x.numpy()
    details: list[Tensor] = []
    for _ in range(levels):
        ca, bands = pywt.dwt2(np.roll(a, (-shift, -shift), axis=(-2, -1)), wavelet, mode="periodization")
        details.append(torch.from_numpy(np.stack(bands, axis=-3)))
        a = ca
    return torch.from_numpy(np.ascontiguousarray(a)), details


def _pywt_inverse(approximation: Tensor, details: list[Tensor], wavelet: str) -> Tensor:
    shift, a = _shift(wavelet), approximation.numpy()
    dtype = a.dtype  # PyWavelets may widen float32 sums; the transform keeps the input's type
    for d in reversed(details):
        bands = d.numpy()
        a = pywt.idwt2(
            (a, (bands[..., 0, :, :], bands[..., 1, :, :], bands[..., 2, :, :])),
            wavelet,
            mode="periodization",
        )
        a = np.roll(a, (shift, shift), axis=(-2, -1))
    return torch.from_numpy(a.astype(dtype, copy=False))


def wavelet_forward(x: Tensor, *, wavelet: str = "db4", levels: int = 4) -> tuple[Tensor, list[Tensor]]:
    """Orthogonal periodic 2-D DWT of the last two axes.

    Returns ``(approximation, details)``: ``approximation`` is ``(..., H/2^J, W/2^J)``,
    ``details[i]`` is ``(..., 3, H/2^(i+1), W/2^(i+1))`` (finest first). Fewer than ``levels``
    levels are used when a dimension becomes odd or shorter than the filter. Real or complex
    input (the filters are real: complex data transform per component). The same coefficients
    on the CPU (PyWavelets) and on CUDA or under autograd (torch convolutions), to float rounding.
    """
    if wavelet not in WAVELETS:
        raise ValueError(f"unknown wavelet {wavelet!r}; known: {sorted(WAVELETS)}")
    n = _levels((x.shape[-2], x.shape[-1]), levels, len(WAVELETS[wavelet]))
    return _pywt_forward(x, wavelet, n) if _on_pywavelets(x) else conv_wavelet_forward(x, wavelet, n)


def wavelet_inverse(approximation: Tensor, details: list[Tensor], *, wavelet: str = "db4") -> Tensor:
    """Inverse (= adjoint) of :func:`wavelet_forward`."""
    if wavelet not in WAVELETS:
        raise ValueError(f"unknown wavelet {wavelet!r}; known: {sorted(WAVELETS)}")
    if _on_pywavelets(approximation) and all(_on_pywavelets(d) for d in details):
        return _pywt_inverse(approximation, details, wavelet)
    return conv_wavelet_inverse(approximation, details, wavelet)


def conv_wavelet_forward(x: Tensor, wavelet: str, levels: int) -> tuple[Tensor, list[Tensor]]:
    """:func:`wavelet_forward` with torch convolutions (any device, autograd), ``levels`` exact."""
    lead = tuple(x.shape[:-2])
    real = x.real.dtype if x.is_complex() else x.dtype
    w_cols, w_rows = _filters(wavelet, real, x.device)
    a = _to_planes(x)
    details: list[Tensor] = []
    for _ in range(levels):
        bands = _dwt2_level(a, w_cols, w_rows)
        a = bands[:, :1]
        details.append(_from_planes(bands[:, 1:], lead, x.is_complex()))
    return _from_planes(a, lead, x.is_complex())[..., 0, :, :], details


def conv_wavelet_inverse(approximation: Tensor, details: list[Tensor], wavelet: str) -> Tensor:
    """:func:`wavelet_inverse` with torch convolutions."""
    lead = tuple(approximation.shape[:-2])
    is_complex = approximation.is_complex()
    real = approximation.real.dtype if is_complex else approximation.dtype
    w_cols, w_rows = _filters(wavelet, real, approximation.device)
    a = _to_planes(approximation)
    for d in reversed(details):
        dp = torch.view_as_real(d).movedim(-1, -4) if is_complex else d
        dp = dp.reshape(-1, 3, d.shape[-2], d.shape[-1])
        a = _idwt2_level(torch.cat([a, dp], dim=1), w_cols, w_rows)
    return _from_planes(a, lead, is_complex)[..., 0, :, :]


def soft_threshold(x: Tensor, thresh: float | Tensor) -> Tensor:
    """Complex soft thresholding: shrink the magnitude by ``thresh``, keep the phase."""
    mag = x.abs()
    return x * (mag - thresh).clamp_min(0) / mag.clamp_min(torch.finfo(mag.dtype).tiny)
