"""A separate reference scan with another field of view, placed on the imaging k-space grid."""

from __future__ import annotations

import numpy as np

from recon_server.mrd.reference import ReferenceSpace, onto_imaging_grid


def _measured(n: int, fov_mm: float) -> np.ndarray:
    """What a scanner measures of a smooth 1-D profile at ``n`` k-space points ``(j - n/2) / fov``:
    its continuous Fourier transform (a fine Riemann sum)."""
    x = np.arange(-2000, 2000) * 0.1  # mm
    profile = np.exp(-((x - 12.0) ** 2) / (2 * 30.0**2)) * np.exp(1j * 0.02 * x)
    k = (np.arange(n) - n // 2) / fov_mm  # cycles / mm
    return (profile[None, :] * np.exp(-2j * np.pi * k[:, None] * x[None, :])).sum(axis=1) * 0.1


def test_reference_of_another_field_of_view_lands_on_the_imaging_grid() -> None:
    ny = nx = 64
    imaging = np.outer(_measured(ny, 240.0), _measured(nx, 240.0))[None]  # (1 coil, ky, kx)
    ref = np.outer(_measured(32, 300.0), _measured(32, 300.0))[None].astype(np.complex64)
    space = ReferenceSpace(enc_nx=32, ny=32, recon_nx=32, fov_mm=(300.0, 300.0), centre_line=16)
    placed, rows = onto_imaging_grid(ref, np.ones(32, dtype=bool), space, ny=ny, nx=nx, fov_mm=(240.0, 240.0))
    # The reference reaches 16 / 300 cycles/mm: imaging rows within 12.8 of the centre.
    assert rows[32 - 11 : 32 + 12].all() and not rows[: 32 - 13].any() and not rows[32 + 14 :].any()
    centre = (slice(None), slice(32 - 10, 32 + 10), slice(32 - 10, 32 + 10))
    error = np.linalg.norm(placed[centre] - imaging[centre]) / np.linalg.norm(imaging[centre])
    assert error < 0.05, error


def test_reference_of_the_same_field_of_view_is_the_centre() -> None:
    ref = (np.arange(2 * 8 * 16).reshape(2, 8, 16) + 1j).astype(np.complex64)
    space = ReferenceSpace(enc_nx=16, ny=8, recon_nx=16, fov_mm=(240.0, 240.0), centre_line=4)
    measured = np.zeros(8, dtype=bool)
    measured[1:7] = True
    placed, rows = onto_imaging_grid(ref, measured, space, ny=32, nx=64, fov_mm=(240.0, 240.0))
    np.testing.assert_array_equal(placed[:, 12:20, 24:40], ref)
    assert np.flatnonzero(rows).tolist() == list(range(13, 19))
    assert np.abs(placed[:, :, :24]).max() == 0
