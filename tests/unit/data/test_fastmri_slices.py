"""fastMRI I/O, the scale convention, prepared slices, the Dataset and subject-level splits."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from recon_server.cli.main import main as cli_main
from recon_server.data import fastmri, slices
from recon_server.mrd.ismrmrd_io import read_raw
from recon_server.recon import scale as scale_rule
from recon_server.recon.fft import fft2c

CF = 0.25  # 16 ACS rows at 64: enough for the 6x6 ESPIRiT kernel


def test_fastmri_write_read_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((2, 3, 8, 16)) + 1j * rng.standard_normal((2, 3, 8, 16))).astype(np.complex64)
    path = tmp_path / "file_brain_AXT2_test.h5"
    fastmri.write_fastmri(path, k, "<ismrmrdHeader/>", "T2", patient_id="p1")
    with h5py.File(path) as f:
        assert f["kspace"].shape == (2, 3, 16, 8)  # fastMRI order: readout before phase
        assert f.attrs["acquisition"] == "AXT2"
        assert np.isclose(f.attrs["max"], f["reconstruction_rss"][()].max())
    scan = fastmri.read_fastmri(path)
    np.testing.assert_array_equal(scan.kspace, k)
    assert (scan.contrast, scan.acquisition, scan.header_xml) == ("T2", "AXT2", "<ismrmrdHeader/>")


def test_fastmri_acquisition_labels() -> None:
    assert fastmri.ACQUISITION_LABELS["AXT1POST"] == "T1POST"
    assert fastmri.ACQUISITION_LABELS["AXFLAIR"] == "FLAIR"


def test_fastmri_file_without_kspace_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=np.zeros(3))
    with pytest.raises(ValueError, match="no 'kspace' dataset"):
        fastmri.read_fastmri(path)
    with pytest.raises(ValueError, match="unknown contrast"):
        fastmri.write_fastmri(tmp_path / "x.h5", np.zeros((1, 1, 4, 4), np.complex64), "", "DWI")


def test_slice_scale_is_the_99th_percentile_of_the_acs_image_and_scales_linearly() -> None:
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.standard_normal((2, 32, 32)).astype(np.float32)).to(torch.complex64)
    maps = torch.ones((2, 1, 32, 32), dtype=torch.complex64)
    k = fft2c(image[:, None])
    acs = (12, 20)
    scale = scale_rule.slice_scale(k[:, :, 12:20], maps, acs=acs)
    low = torch.zeros_like(k)
    low[:, :, 12:20] = k[:, :, 12:20]
    expected = torch.quantile(
        torch.fft.fftshift(
            torch.fft.ifft2(torch.fft.ifftshift(low[:, 0], dim=(-2, -1)), norm="ortho"), dim=(-2, -1)
        )
        .abs()
        .reshape(2, -1),
        0.99,
        dim=1,
    )
    torch.testing.assert_close(scale, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        scale_rule.slice_scale(3 * k[:, :, 12:20], maps, acs=acs), 3 * scale, rtol=1e-5, atol=0
    )
    with pytest.raises(ValueError, match="does not match"):
        scale_rule.slice_scale(k[:, :, 12:20], maps, acs=(10, 20))


def test_crop_or_pad_and_centre_acs() -> None:
    x = torch.arange(6 * 4, dtype=torch.float32).reshape(1, 6, 4)
    y = slices.crop_or_pad(x, 4)
    assert y.shape == (1, 4, 4) and torch.equal(y[0, :, :], x[0, 1:5, :])
    z = slices.crop_or_pad(x, 8)
    assert z.shape == (1, 8, 8) and torch.equal(z[0, 1:7, 2:6], x[0])
    assert scale_rule.centre_acs(320, 0.08) == (147, 173)  # fastMRI: 26 lines, DC line 160 inside


def test_split_is_subject_level_and_deterministic() -> None:
    subjects = [f"s{i}" for i in range(10)] * 3
    a = slices.split_subjects(subjects, val_fraction=0.2, seed=4)
    b = slices.split_subjects(subjects, val_fraction=0.2, seed=4)
    c = slices.split_subjects(subjects, val_fraction=0.2, seed=5)
    assert a == b and len(a[1]) == 2 and not set(a[0]) & set(a[1])
    assert set(a[0]) | set(a[1]) == set(subjects)
    assert a != c


@pytest.fixture(scope="module")
def prepared(sim_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """prepare-data on the simulated subjects, and on the same k-space written as fastMRI files."""
    root = tmp_path_factory.mktemp("prep")
    fm_dir = root / "fastmri_in"
    fm_dir.mkdir()
    for sub in sorted(sim_dir.glob("sub-*")):
        ref = read_raw(sub / "reference.h5")
        meta = json.loads((sub / "subject.json").read_text())
        k = np.zeros((meta["slices"], meta["coils"], meta["matrix"], 2 * meta["matrix"]), np.complex64)
        for h, d in zip(ref.acquisition_headers[4:], ref.data[4:], strict=True):
            k[h["idx"]["slice"], :, h["idx"]["kspace_encode_step_1"], :] = d
        fastmri.write_fastmri(fm_dir / f"{sub.name}.h5", k, ref.header_xml, "FLAIR")
    out = {"simulated": root / "from_sim", "fastmri": root / "from_fastmri"}
    for source, src in (("simulated", sim_dir), ("fastmri", fm_dir)):
        code = cli_main(
            [
                "prepare-data",
                "--source",
                source,
                str(src),
                "--out",
                str(out[source]),
                "--center-fraction",
                str(CF),
            ]
        )
        assert code == 0
    return out


def test_prepare_data_gives_the_same_slices_from_ismrmrd_and_fastmri(prepared: dict[str, Path]) -> None:
    a = np.load(prepared["simulated"] / "slices.npy")
    b = np.load(prepared["fastmri"] / "slices.npy")
    assert a.shape == b.shape == (6, 64, 64) and a.dtype == np.complex64
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(a).max())
    ia = json.loads((prepared["simulated"] / "index.json").read_text())
    ib = json.loads((prepared["fastmri"] / "index.json").read_text())
    assert [r["contrast"] for r in ia["slices"]] == [r["contrast"] for r in ib["slices"]] == ["FLAIR"] * 6
    assert [r["subject"] for r in ia["slices"]][::3] == ["sim/sub-000", "sim/sub-001"]
    assert [r["subject"] for r in ib["slices"]][::3] == ["sub-000", "sub-001"]


def test_prepared_slices_match_the_truth_and_follow_the_scale_rule(
    prepared: dict[str, Path], sim_dir: Path
) -> None:
    data = np.load(prepared["simulated"] / "slices.npy")
    truth = np.load(sim_dir / "sub-000" / "truth.npy")
    for s in range(3):
        mag, ref = np.abs(data[s]), np.abs(truth[s])
        inside = ref > 0.1 * ref.max()
        assert np.corrcoef(mag[inside], ref[inside])[0, 1] > 0.95
    # Normalised: the ACS low-resolution image has its 99th percentile near 1, so images are O(1).
    assert 0.5 < np.percentile(np.abs(data), 99) < 3.0


def test_dataset_returns_two_channel_slices_labels_and_flips(prepared: dict[str, Path]) -> None:
    root = prepared["simulated"]
    ds_all = slices.SliceDataset(root, split="all", augment=False)
    assert len(ds_all) == 6
    x, label = ds_all[0]
    assert x.shape == (2, 64, 64) and x.dtype == torch.float32 and label == 3  # FLAIR slot
    raw = np.load(root / "slices.npy")[0]
    np.testing.assert_array_equal(x[0].numpy(), raw.real)
    train = slices.SliceDataset(root, split="train", val_fraction=0.5, seed=0)
    val = slices.SliceDataset(root, split="val", val_fraction=0.5, seed=0)
    assert len(train) == len(val) == 3 and not set(train.subjects) & set(val.subjects)
    flipped = slices.SliceDataset(root, split="all", augment=True, generator=torch.Generator().manual_seed(0))
    seen = {tuple(torch.equal(flipped[0][0], v) for v in (x, x.flip(-1), x.flip(-2), x.flip(-2, -1)))}
    for _ in range(12):
        y, _ = flipped[0]
        seen.add(tuple(torch.equal(y, v) for v in (x, x.flip(-1), x.flip(-2), x.flip(-2, -1))))
    assert len(seen) > 1 and all(any(s) for s in seen)
    with pytest.raises(ValueError, match="no slot"):
        slices.SliceDataset(root, contrasts=["T1", "T2"])


def test_prepare_data_rejects_undersampled_ismrmrd(sim_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fully sampled"):
        list(slices.iter_scans("ismrmrd", sim_dir / "sub-000" / "raw.h5"))
    assert cli_main(["simulate", "--out", str(tmp_path), "--contrast", "PDW"]) == 2
    assert cli_main(["simulate", "--out", str(tmp_path), "--matrix", "63"]) == 2
