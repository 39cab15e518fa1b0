"""fastMRI-style masks: sampled fraction, centre, reproducibility, and the inverse (ACS, R)."""

from __future__ import annotations

import numpy as np
import pytest

from recon_server.recon.masks import acceleration_of, acs_region, equispaced_mask, mask_2d, random_mask


@pytest.mark.parametrize("kind", [equispaced_mask, random_mask])
@pytest.mark.parametrize("num_cols", [256, 320, 368])
@pytest.mark.parametrize("accel", range(2, 9))
def test_fraction_and_centre(kind, num_cols: int, accel: int) -> None:
    mask = kind(num_cols, accel, rng=np.random.default_rng(accel))
    assert mask.dtype == bool and mask.shape == (num_cols,)
    assert acceleration_of(mask) == pytest.approx(accel, rel=0.08)
    cf = 0.08 if accel <= 4 else 0.04
    num_low = round(num_cols * cf)
    pad = (num_cols - num_low + 1) // 2
    assert mask[pad : pad + num_low].all()
    start, stop = acs_region(mask)
    assert start <= num_cols // 2 < stop and stop - start >= num_low


def test_random_mask_is_exact_and_seeded() -> None:
    a = random_mask(320, 4, rng=np.random.default_rng(7))
    b = random_mask(320, 4, rng=np.random.default_rng(7))
    c = random_mask(320, 4, rng=np.random.default_rng(8))
    assert (a == b).all() and not (a == c).all()
    assert a.sum() == 80


def test_equispaced_offset_and_center_fraction() -> None:
    m0 = equispaced_mask(256, 4, offset=0, center_fraction=0.1)
    m1 = equispaced_mask(256, 4, offset=1, center_fraction=0.1)
    assert m0[0] and not m1[0] and m1[1]
    assert acs_region(m0) == (115, 141) or acs_region(m0)[1] - acs_region(m0)[0] >= 26
    with pytest.raises(ValueError, match="offset"):
        equispaced_mask(256, 4, offset=99)
    with pytest.raises(ValueError, match="acceleration"):
        equispaced_mask(256, 0)
    with pytest.raises(ValueError, match="center fraction"):
        random_mask(64, 8, center_fraction=0.5)


def test_mask_2d_and_inverse() -> None:
    lines = equispaced_mask(96, 3, offset=0)
    m = mask_2d(lines, 80)
    assert m.shape == (96, 80) and (m[:, 0] == lines).all() and (m.all(axis=1) == lines).all()
    assert acs_region(m) == acs_region(lines)
    assert acceleration_of(m) == pytest.approx(96 / lines.sum())
    with pytest.raises(ValueError, match="1-D"):
        mask_2d(m, 80)


def test_acs_region_picks_central_run() -> None:
    lines = np.zeros(40, dtype=bool)
    lines[2:12] = True  # long run far from the centre
    lines[18:25] = True  # contains centre line 20
    assert acs_region(lines) == (18, 25)
    lines[20] = False  # centre missing: nearest run wins
    assert acs_region(lines, min_lines=2) == (21, 25)


def test_no_acs_lines() -> None:
    lines = np.zeros(64, dtype=bool)
    lines[::4] = True
    with pytest.raises(ValueError, match="no ACS region found"):
        acs_region(lines)
    with pytest.raises(ValueError, match="no ACS region found"):
        acs_region(np.zeros(64, dtype=bool))
    with pytest.raises(ValueError, match="no phase-encode line"):
        acceleration_of(np.zeros(64, dtype=bool))


@pytest.mark.parametrize("make", [equispaced_mask, random_mask])
def test_centre_that_fills_the_whole_budget_is_refused(make) -> None:
    # 96 lines, centre 0.25 -> 24 lines = 96 / 4: no room for outer lines at R=4.
    with pytest.raises(ValueError, match="center fraction 0.25 already samples 24 of 96"):
        make(96, 4, center_fraction=0.25, rng=np.random.default_rng(0))
