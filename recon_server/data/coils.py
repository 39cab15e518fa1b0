"""Simulated receive coils: loop-coil sensitivities, correlated coil noise, and their combined weight.

Coils: Biot-Savart fields of circular loops (24 segments, radius set by the spacing) on an elliptic
cylinder around the head (1, 2 or 4 rings), ``S_c ~ B_x - i B_y``, computed on a coarse grid per
slice, upsampled bicubically, and normalised so ``sum_c |S_c|^2 = 1``. Noise: ``sigma L w`` with
``w ~ CN(0, I)`` and coil covariance ``Psi = L L^H`` (:func:`noise_mixing`).
"""

from __future__ import annotations

import numpy as np
import torch


def coil_sensitivities(
    pixels_lps: np.ndarray, centre_lps: np.ndarray, coils: int, rng: np.random.Generator, *, coarse: int = 24
) -> np.ndarray:
    """Loop-coil receive maps ``(slices, coils, ny, nx)`` complex64, ``sum_c |S_c|^2 = 1``.

    Loops of ``coils`` elements on an elliptic cylinder (semi-axes ~105 mm LR, ~125 mm AP, rings
    50 mm apart along z) around ``centre_lps``; Biot-Savart ``B(r) = sum dl x (r - m) / |r - m|^3``
    on a coarse grid, ``S_c = (B_x - i B_y) e^{i theta_c}``, bicubic upsampling, normalisation.
    """
    s, ny, nx, _ = pixels_lps.shape
    iy = np.linspace(0, ny - 1, coarse).round().astype(int)
    ix = np.linspace(0, nx - 1, coarse).round().astype(int)
    pts = pixels_lps[:, iy][:, :, ix] - centre_lps  # (S, g, g, 3) relative to the head centre
    rings = 1 if coils <= 8 else (2 if coils <= 20 else 4)
    per_ring = [coils // rings + (1 if r < coils % rings else 0) for r in range(rings)]
    ax, ay = 105.0 * rng.uniform(0.95, 1.05), 125.0 * rng.uniform(0.95, 1.05)
    seg = np.linspace(0, 2 * np.pi, 25)[:-1]
    fields = []
    for r, count in enumerate(per_ring):
        z0 = (r - (rings - 1) / 2.0) * 50.0 + rng.uniform(-5, 5)
        radius = min(55.0, 0.9 * np.pi * (ax + ay) / 2.0 / max(count, 1))
        start = rng.uniform(0, 2 * np.pi)
        for k in range(count):
            th = start + 2 * np.pi * k / count
            centre = np.array([ax * np.cos(th), ay * np.sin(th), z0])
            normal = np.array([np.cos(th) / ax, np.sin(th) / ay, 0.0])
            normal /= np.linalg.norm(normal)
            tangent = np.array([-normal[1], normal[0], 0.0])
            axial = np.array([0.0, 0.0, 1.0])
            wire = centre + radius * (np.cos(seg)[:, None] * tangent + np.sin(seg)[:, None] * axial)
            dl = np.roll(wire, -1, axis=0) - wire
            mid = wire + dl / 2
            rel = pts[..., None, :] - mid  # (S, g, g, segments, 3)
            dist3 = np.linalg.norm(rel, axis=-1, keepdims=True) ** 3
            b = (np.cross(dl, rel) / np.maximum(dist3, 1.0)).sum(-2)
            fields.append((b[..., 0] - 1j * b[..., 1]) * np.exp(1j * rng.uniform(0, 2 * np.pi)))
    coarse_maps = torch.from_numpy(np.stack(fields, axis=1).astype(np.complex64))  # (S, C, g, g)
    # Separable bicubic upsampling as two small matrix products (cheaper than interpolate).
    wy = _interp_matrix(ny, coarse).to(torch.complex64)
    wx = _interp_matrix(nx, coarse).to(torch.complex64)
    maps = wy @ coarse_maps @ wx.T
    rss = torch.view_as_real(maps).square().sum(dim=(1, -1), keepdim=False).sqrt().clamp_min(1e-12)
    maps = maps / rss[:, None]
    return maps.numpy()


def prewhitened_coil_weight(maps: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """``||L^-1 S(r)||`` per pixel ``(slices, ny, nx)`` float32, median 1 where the coils see.

    After prewhitening (noise covariance ``sigma^2 L L^H``) the coil images are ``L^-1 S m``, so a
    coil combination with unit-norm estimated maps returns ``m ||L^-1 S||``, not the object ``m``:
    a smooth intensity weighting (+-15 % with the simulator's per-coil noise gains) that no
    reconstruction can undo from the data. ``|truth| x this`` is the noiseless image the data
    determine, the reference the evaluation compares with (``recon_server.research.evaluate``).
    """
    whitened = np.einsum("ij,sjyx->siyx", np.linalg.inv(mix), maps)
    weight = np.sqrt((np.abs(whitened) ** 2).sum(axis=1))
    return (weight / max(float(np.median(weight[weight > 0])), 1e-12)).astype(np.float32)


def noise_mixing(coils: int, rng: np.random.Generator) -> np.ndarray:
    """``L`` with ``Psi = L L^H``: identity plus weak random coupling, per-coil gains 0.85-1.15,
    scaled so that ``mean(diag(Psi)) = 1``."""
    g = (rng.standard_normal((coils, coils)) + 1j * rng.standard_normal((coils, coils))) / np.sqrt(2)
    mix = np.eye(coils) + 0.12 * g
    mix = mix * rng.uniform(0.85, 1.15, size=(coils, 1))
    mix /= np.sqrt(np.real(np.trace(mix @ mix.conj().T)) / coils)
    return mix.astype(np.complex64)


def complex_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """``CN(0, 1)`` samples (real and imaginary parts ``N(0, 1/2)``), complex64.

    Drawn by torch (about twice as fast as numpy here) from a generator seeded by ``rng``.
    """
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
    return torch.randn(shape, dtype=torch.complex64, generator=gen)


def _interp_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """``(n_out, n_in)`` bicubic interpolation weights (``align_corners=True``), real float32."""
    eye = torch.eye(n_in, dtype=torch.float32)[:, None, :, None]  # (n_in, 1, n_in, 1)
    w = torch.nn.functional.interpolate(eye, size=(n_out, 1), mode="bicubic", align_corners=True)
    return w[:, 0, :, 0].T.contiguous()
