"""Cartesian 1-D undersampling masks over phase-encode lines, and their inverse.

fastMRI conventions (``fastmri.data.subsample``): a fully sampled centre of
``num_low = round(num_cols * center_fraction)`` lines starting at ``(num_cols - num_low + 1) // 2``
(so it always contains the DC line ``num_cols // 2``), default ``center_fraction`` 0.08 for
``R <= 4`` and 0.04 above. The outer lines are chosen so that the *overall* sampled fraction is
about ``1 / R`` (fastMRI's ``EquispacedMaskFractionFunc`` rule for equispaced masks; for random
masks a fixed number of outer lines drawn without replacement, so the fraction is exact rather
than binomially distributed as in fastMRI's per-line coin flips).

Masks are numpy bool arrays (the assembler works in numpy); the caller converts to torch.
The inverse functions (:func:`acs_region`, :func:`acceleration_of`) read which lines were present
in acquired data.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "acceleration_of",
    "acs_region",
    "default_center_fraction",
    "equispaced_mask",
    "mask_2d",
    "random_mask",
]


def default_center_fraction(acceleration: float) -> float:
    """fastMRI default fully sampled centre fraction: 0.08 for R <= 4, 0.04 above."""
    return 0.08 if acceleration <= 4 else 0.04


def _check(num_cols: int, acceleration: int, center_fraction: float | None) -> int:
    """Validate the mask settings and return the number of centre lines."""
    if int(num_cols) != num_cols or num_cols < 2:
        raise ValueError(f"num_cols must be an integer >= 2, got {num_cols}")
    if int(acceleration) != acceleration or not 1 <= acceleration <= num_cols:
        raise ValueError(f"acceleration must be an integer in [1, num_cols={num_cols}], got {acceleration}")
    cf = default_center_fraction(acceleration) if center_fraction is None else float(center_fraction)
    if not 0.0 < cf <= 1.0:
        raise ValueError(f"center_fraction must be in (0, 1], got {cf}")
    num_low = max(1, round(num_cols * cf))
    # At num_low * R == N the centre alone is the whole budget: no outer lines could be placed.
    if num_low * acceleration >= num_cols and acceleration > 1:
        raise ValueError(
            f"center fraction {cf} already samples {num_low} of {num_cols} lines, "
            f"at least 1/R at R={acceleration}"
        )
    return num_low


def _center(num_cols: int, num_low: int) -> np.ndarray:
    mask = np.zeros(num_cols, dtype=bool)
    pad = (num_cols - num_low + 1) // 2
    mask[pad : pad + num_low] = True
    return mask


def equispaced_mask(
    num_cols: int,
    acceleration: int,
    *,
    center_fraction: float | None = None,
    offset: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Equispaced phase-encode mask with a fully sampled centre, overall fraction about ``1/R``.

    The outer lines are spaced by ``R' = R (num_low - N) / (num_low R - N)`` (non-integer in
    general, rounded to the nearest line), which makes ``(N - num_low) / R' + num_low ~ N / R``.
    ``offset`` is the first outer line (``0 <= offset < ceil(R')``); drawn from ``rng`` if None
    (a fresh default generator if ``rng`` is None as well).

    Returns bool ``(num_cols,)``, True where a phase-encode line is sampled.
    """
    num_low = _check(num_cols, acceleration, center_fraction)
    mask = _center(num_cols, num_low)
    if acceleration == 1:
        return np.ones(num_cols, dtype=bool)
    spacing = acceleration * (num_low - num_cols) / (num_low * acceleration - num_cols)
    max_offset = int(np.ceil(spacing))
    if offset is None:
        offset = int((rng if rng is not None else np.random.default_rng()).integers(0, max_offset))
    elif not 0 <= offset < max_offset:
        raise ValueError(f"offset must be in [0, {max_offset}) for spacing {spacing:.3f}, got {offset}")
    lines = np.round(np.arange(offset, num_cols - 1, spacing)).astype(np.int64)
    mask[lines[lines < num_cols]] = True
    return mask


def random_mask(
    num_cols: int,
    acceleration: int,
    *,
    center_fraction: float | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Random phase-encode mask with a fully sampled centre and exactly ``round(N/R)`` lines in all.

    ``round(N/R) - num_low`` outer lines are drawn uniformly without replacement from the lines
    outside the centre. Returns bool ``(num_cols,)``.
    """
    num_low = _check(num_cols, acceleration, center_fraction)
    if acceleration == 1:
        return np.ones(num_cols, dtype=bool)
    mask = _center(num_cols, num_low)
    gen = rng if rng is not None else np.random.default_rng()
    outer = np.flatnonzero(~mask)
    count = max(0, round(num_cols / acceleration) - num_low)
    mask[gen.choice(outer, size=count, replace=False)] = True
    return mask


def mask_2d(lines: np.ndarray, num_readout: int) -> np.ndarray:
    """Expand a phase-encode line mask ``(ky,)`` to a k-space mask ``(ky, kx)`` (readout fully sampled)."""
    lines = np.asarray(lines)
    if lines.ndim != 1:
        raise ValueError(f"lines must be 1-D (ky,), got shape {lines.shape}")
    if int(num_readout) != num_readout or num_readout < 1:
        raise ValueError(f"num_readout must be a positive integer, got {num_readout}")
    return np.repeat(lines.astype(bool)[:, None], int(num_readout), axis=1)


def _as_lines(sampled_lines: np.ndarray) -> np.ndarray:
    """Accept a line mask ``(ky,)`` or a k-space mask ``(ky, kx)`` (a row counts if any sample is set)."""
    arr = np.asarray(sampled_lines)
    if arr.ndim == 2:
        arr = np.asarray(arr.astype(bool).any(axis=1))
    if arr.ndim != 1:
        raise ValueError(f"sampled_lines must be (ky,) or (ky, kx), got shape {np.shape(sampled_lines)}")
    return arr.astype(bool)


def acs_region(sampled_lines: np.ndarray, *, min_lines: int = 4) -> tuple[int, int]:
    """``(start, stop)`` of the fully sampled calibration (ACS) block, ``stop`` exclusive.

    The block is the contiguous run of sampled lines that contains the centre line ``ky // 2``,
    or, if the centre line is missing, the run nearest to it (ties: the longer run). Raises
    ValueError ("no ACS region found ...") if that run is shorter than ``min_lines``.
    Accepts ``(ky,)`` or ``(ky, kx)`` masks.
    """
    lines = _as_lines(sampled_lines)
    n = lines.size
    padded = np.concatenate([[False], lines, [False]]).astype(np.int8)
    edges = np.diff(padded)
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if starts.size == 0:
        raise ValueError("no ACS region found: no phase-encode line is sampled")
    centre = n // 2
    # Distance from the centre line to each run (0 if the run contains it).
    dist = np.maximum(0, np.maximum(starts - centre, centre - (stops - 1)))
    best = min(range(starts.size), key=lambda i: (dist[i], -(stops[i] - starts[i])))
    start, stop = int(starts[best]), int(stops[best])
    if stop - start < min_lines:
        raise ValueError(
            f"no ACS region found: the central fully sampled run has {stop - start} lines "
            f"({start}..{stop - 1}), fewer than min_lines={min_lines}"
        )
    return start, stop


def acceleration_of(sampled_lines: np.ndarray) -> float:
    """Nominal acceleration: number of phase-encode lines / number of sampled lines."""
    lines = _as_lines(sampled_lines)
    count = int(lines.sum())
    if count == 0:
        raise ValueError("acceleration undefined: no phase-encode line is sampled")
    return lines.size / count
