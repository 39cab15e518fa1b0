"""Simulator physics on its own tissue labels: contrast ordering, lesions, enhancement, coils, noise."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from recon_server.data import acquire, contrast
from recon_server.recon.fft import fft2c

MID = {"matrix": 96, "slices": 6, "coils": 2, "acceleration": 4, "center_fraction": 0.2}


def _subject(label: str, *, lesions: bool = False, seed: int = 3) -> acquire.SimulatedSubject:
    cfg = acquire.SimulationConfig(
        contrast=label, lesions=lesions, lesion_count=3 if lesions else None, **MID
    )
    return acquire.simulate_subject(cfg, seed=seed, index=0)


def _tissue_means(subject: acquire.SimulatedSubject) -> dict[str, float]:
    mag = np.abs(subject.truth)
    out = {}
    for name, threshold in (("WM", 0.9), ("GM", 0.8), ("CSF", 0.9)):
        mask = (subject.labels[name] > threshold) & (subject.labels["LESION"] < 0.05)
        assert mask.sum() > 30, f"too few pure {name} voxels ({mask.sum()})"
        out[name] = float(mag[mask].mean())
    return out


def test_t1_weighting_orders_wm_gm_csf() -> None:
    m = _tissue_means(_subject("T1"))
    assert m["WM"] > 1.1 * m["GM"] and m["GM"] > 1.5 * m["CSF"], m


def test_t2_weighting_orders_csf_gm_wm() -> None:
    m = _tissue_means(_subject("T2"))
    assert m["CSF"] > 1.5 * m["GM"] and m["GM"] > 1.1 * m["WM"], m


def test_flair_nulls_csf_and_keeps_gm_above_wm() -> None:
    m = _tissue_means(_subject("FLAIR"))
    assert m["CSF"] < 0.3 * m["WM"], m
    assert m["GM"] > 1.1 * m["WM"], m


@pytest.mark.parametrize("label", ["FLAIR", "T2"])
def test_lesions_are_brighter_than_their_parent_tissue(label: str) -> None:
    plain, sick = _subject(label), _subject(label, lesions=True)
    assert np.array_equal(plain.labels["WM"], sick.labels["WM"])  # same anatomy: lesions only add
    core = sick.labels["LESION"] > 0.5
    assert core.sum() > 20, f"lesions cover only {core.sum()} voxels"
    ratio = np.abs(sick.truth[core]).mean() / np.abs(plain.truth[core]).mean()
    assert ratio > 1.3, f"{label} lesion / parent tissue = {ratio:.2f}"
    untouched = sick.labels["LESION"] == 0
    assert np.allclose(np.abs(sick.truth[untouched]), np.abs(plain.truth[untouched]), rtol=1e-5, atol=1e-7)


def test_lesions_are_darker_on_t1() -> None:
    plain, sick = _subject("T1"), _subject("T1", lesions=True)
    core = sick.labels["LESION"] > 0.5
    assert np.abs(sick.truth[core]).mean() < 0.95 * np.abs(plain.truth[core]).mean()


def test_gadolinium_brightens_enhancing_structures_only() -> None:
    pre, post = _subject("T1"), _subject("T1POST")
    enhancing = (post.labels["VESSEL"] + post.labels["CHOROID"] + post.labels["DURA"]) > 0.3
    assert enhancing.sum() > 10
    gain = np.abs(post.truth[enhancing]).mean() / np.abs(pre.truth[enhancing]).mean()
    assert gain > 1.3, f"enhancement gain {gain:.2f}"
    brain = (post.labels["WM"] > 0.9) & (
        post.labels["VESSEL"] + post.labels["DURA"] + post.labels["CHOROID"] == 0
    )
    assert np.allclose(np.abs(post.truth[brain]), np.abs(pre.truth[brain]), rtol=1e-5)


def test_csf_null_inversion_time() -> None:
    ti = contrast.csf_null_ti(9000.0, 4300.0)
    assert 2400 < ti < 2600  # reference: TR 9000, T1 4300 -> TI ~ 2480 ms
    seq = contrast.draw_sequence("FLAIR", np.random.default_rng(0), tr=9000.0, te=100.0)
    csf = contrast.Tissue(4300.0, 2000.0, 1.0)
    assert abs(contrast.signal(seq, csf)) < 1e-3


def test_coil_maps_are_normalised_and_noise_matches_sigma(small_subject: acquire.SimulatedSubject) -> None:
    rss = np.sqrt((np.abs(small_subject.maps) ** 2).sum(axis=1))
    np.testing.assert_allclose(rss, 1.0, atol=1e-4)
    sigma = float(small_subject.metadata["noise_sigma"])
    measured = np.sqrt(np.mean(np.abs(small_subject.noise) ** 2))
    assert abs(measured / sigma - 1) < 0.1, (measured, sigma)
    # The k-space holds exactly y = F(pad_x(S x)) plus noise of that level.
    coil_images = torch.from_numpy(small_subject.maps * small_subject.truth[:, None])
    pad = (small_subject.kspace.shape[-1] - coil_images.shape[-1]) // 2
    clean = fft2c(torch.nn.functional.pad(coil_images, (pad, pad))).numpy()
    residual = small_subject.kspace - clean
    assert abs(np.sqrt(np.mean(np.abs(residual) ** 2)) / sigma - 1) < 0.05
    snr = float(small_subject.metadata["signal_wm"]) / sigma
    assert 30 <= snr <= 40


def test_simulation_is_deterministic_and_seed_dependent(small_config: acquire.SimulationConfig) -> None:
    a = acquire.simulate_subject(small_config, seed=5, index=1)
    b = acquire.simulate_subject(small_config, seed=5, index=1)
    c = acquire.simulate_subject(small_config, seed=6, index=1)
    assert np.array_equal(a.kspace, b.kspace) and np.array_equal(a.truth, b.truth)
    assert a.metadata == b.metadata
    assert not np.allclose(np.abs(a.truth), np.abs(c.truth))


def test_contrast_does_not_change_anatomy(small_config: acquire.SimulationConfig) -> None:
    flair = acquire.simulate_subject(small_config, seed=5, index=1)
    t2 = acquire.simulate_subject(dataclasses.replace(small_config, contrast="T2"), seed=5, index=1)
    assert np.array_equal(flair.labels["GM"], t2.labels["GM"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"contrast": "PDW"}, "unknown contrast"),
        ({"contrast": "FLAIR", "tr": 9000.0, "ti": 9500.0}, "TI=9500"),
        ({"contrast": "T2", "tr": 4000.0, "te": 4100.0}, "TE=4100"),
        ({"contrast": "T1", "ti": 500.0}, "no inversion"),
        ({"matrix": 65}, "even"),
        ({"readout_oversampling": 3}, "oversampling"),
        ({"acceleration": 40, "matrix": 64}, "center fraction"),
    ],
)
def test_bad_settings_raise_clear_value_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        acquire.SimulationConfig(**kwargs)
