"""MR Image Storage writer: validators, geometry round trip, UIDs, marking, bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest

from recon_server.dicom.identity import make_uid
from recon_server.dicom.writer import (
    GENERATED_STUDY_UID_NOTE,
    MAX_STORED,
    build_series,
    scanning_sequence,
    write_atomic,
    write_series,
)
from recon_server.scan_header import ScanHeader

GEOMETRIES = [
    pytest.param(False, True, id="axial-flair"),
    pytest.param(True, True, id="oblique-flair"),
    pytest.param(False, False, id="axial-t1"),
    pytest.param(True, False, id="oblique-t1"),
]


@pytest.mark.parametrize(("oblique", "flair"), GEOMETRIES)
def test_dicom3tools_accept_every_file_and_series(tmp_path, vol, validate, oblique, flair):
    volume = vol.make_volume(oblique=oblique, flair=flair, rows=30, cols=32, fov_xy=(220.0, 165.0))
    files = write_series(volume, tmp_path)
    assert len(files) == 4
    validate(files)


def _voxel_centres_from_tags(ds: pydicom.Dataset) -> np.ndarray:
    """(rows, cols, 3) voxel centres from IPP/IOP/PixelSpacing (PS3.3 C.7.6.2.1.1)."""
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    r = np.arange(ds.Rows)[:, None, None]
    c = np.arange(ds.Columns)[None, :, None]
    return ipp + c * col_spacing * iop[:3] + r * row_spacing * iop[3:]


def _voxel_centres_from_mrd(geom, rows: int, cols: int) -> np.ndarray:
    """(rows, cols, 3) voxel centres implied by the ISMRMRD slice centre and FOV."""
    dx, dy = geom.fov_mm[0] / cols, geom.fov_mm[1] / rows
    r = (np.arange(rows) - rows / 2 + 0.5)[:, None, None]
    c = (np.arange(cols) - cols / 2 + 0.5)[None, :, None]
    return np.array(geom.position) + c * dx * np.array(geom.read_dir) + r * dy * np.array(geom.phase_dir)


@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_geometry_round_trip(tmp_path, vol, oblique):
    # non-square matrix and anisotropic pixels: a swapped PixelSpacing or rows/cols would show
    rows, cols = 30, 32
    volume = vol.make_volume(oblique=oblique, rows=rows, cols=cols, fov_xy=(220.0, 165.0))
    files = write_series(volume, tmp_path)
    datasets = [pydicom.dcmread(f) for f in files]
    for ds, geom in zip(datasets, volume.geometry, strict=True):
        got = _voxel_centres_from_tags(ds)
        want = _voxel_centres_from_mrd(geom, rows, cols)
        assert np.max(np.abs(got - want)) < 0.01
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        np.testing.assert_allclose(iop[:3], geom.read_dir, atol=1e-6)
        np.testing.assert_allclose(iop[3:], geom.phase_dir, atol=1e-6)
        # the image centre is the MRD slice centre
        centre = got[rows // 2 - 1 : rows // 2 + 1, cols // 2 - 1 : cols // 2 + 1].mean(axis=(0, 1))
        np.testing.assert_allclose(centre, geom.position, atol=0.01)
        assert float(ds.PixelSpacing[0]) == pytest.approx(165.0 / rows)  # row spacing = dy
        assert float(ds.PixelSpacing[1]) == pytest.approx(220.0 / cols)  # column spacing = dx
        assert float(ds.SpacingBetweenSlices) == pytest.approx(6.0)
        assert float(ds.SliceThickness) == pytest.approx(5.0)
        assert float(ds.SliceLocation) == pytest.approx(np.dot(got[0, 0], geom.slice_dir), abs=1e-3)

    # independent reader: highdicom assembles the series into a volume
    hd = highdicom.get_volume_from_series(datasets)
    assert hd.spatial_shape == (4, rows, cols)
    np.testing.assert_allclose(hd.pixel_spacing, [165.0 / rows, 220.0 / cols], atol=1e-6)
    assert hd.spacing_between_slices == pytest.approx(6.0, abs=1e-3)
    unit = hd.unit_vectors()
    g0 = volume.geometry[0]
    np.testing.assert_allclose(unit[1], g0.phase_dir, atol=1e-6)  # down the rows
    np.testing.assert_allclose(unit[2], g0.read_dir, atol=1e-6)  # along a row
    assert abs(abs(float(np.dot(unit[0], g0.slice_dir))) - 1) < 1e-6
    # every voxel of highdicom's affine lands on the MRD voxel centres
    for k in range(4):
        idx = np.stack(np.meshgrid([k], np.arange(rows), np.arange(cols), indexing="ij"), -1).reshape(-1, 3)
        centres = hd.map_indices_to_reference(idx).reshape(rows, cols, 3)
        # highdicom may order slices either way along the normal; match by position
        dist = [np.max(np.abs(centres - _voxel_centres_from_mrd(g, rows, cols))) for g in volume.geometry]
        assert min(dist) < 0.01


def test_pixels_window_and_marking(tmp_path, vol):
    volume = vol.make_volume()
    ds_list = build_series(volume)
    stored = np.stack([ds.pixel_array for ds in ds_list])
    scale = MAX_STORED / volume.magnitude.max()
    assert stored.dtype == np.uint16 and stored.max() == MAX_STORED
    np.testing.assert_allclose(stored, volume.magnitude * scale, atol=0.5 + 1e-3)
    ds = ds_list[0]
    assert float(ds.WindowCenter) == pytest.approx(volume.window_center * scale, rel=1e-6)
    assert float(ds.WindowWidth) == pytest.approx(volume.window_width * scale, rel=1e-6)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "OTHER", "M", "AI_DPS"]
    assert ds.SeriesDescription == "FLAIR tra [AI recon: dps]"
    assert "flair-dpm 2024.03.1" in ds.DerivationDescription
    assert "AI reconstruction" in ds.ImageComments
    assert ds.Manufacturer == "recon-server"
    codes = [item.PurposeOfReferenceCodeSequence[0].CodeValue for item in ds.ContributingEquipmentSequence]
    assert codes == ["109101", "109102"]
    scanner, proc = ds.ContributingEquipmentSequence
    assert (scanner.Manufacturer, scanner.ManufacturerModelName) == ("SIEMENS", "Prisma")
    assert proc.ManufacturerModelName == "flair-dpm"
    assert "flair-dpm 2024.03.1" in list(proc.SoftwareVersions)
    # scanner's study and frame of reference, new series
    assert ds.StudyInstanceUID == vol.STUDY_UID
    assert ds.FrameOfReferenceUID == vol.FRAME_UID
    assert ds.SeriesNumber == 740000  # scanner series 7, method slot 4 (dps), series index 0
    assert ds.AccessionNumber == "00A123"  # schema says int; leading zeros kept
    assert (ds.PatientSex, ds.PatientBirthDate, ds.StudyDate, ds.StudyTime) == (
        "F",
        "19610704",
        "20240305",
        "081530",
    )


def test_non_ai_recon_is_not_marked_ai(vol):
    ds = build_series(vol.make_volume(model=False))[0]
    assert ds.SeriesDescription == "FLAIR tra [recon: dps]"
    assert "AI" not in "".join(ds.ImageType)


def test_sequence_mapping_flair_and_t1(vol):
    flair = build_series(vol.make_volume(flair=True))[0]
    assert list(flair.ScanningSequence) == ["SE", "IR"]
    assert list(flair.SequenceVariant) == ["SK", "MP"]
    assert float(flair.InversionTime) == 2500.0
    assert (float(flair.RepetitionTime), float(flair.EchoTime), int(flair.EchoTrainLength)) == (
        9000.0,
        81.0,
        16,
    )
    t1 = build_series(vol.make_volume(flair=False))[0]
    assert t1.ScanningSequence == "SE" and "InversionTime" not in t1
    assert t1.MRAcquisitionType == "2D"


@pytest.mark.parametrize(
    ("sequence_type", "ti", "expected"),
    [
        ("InversionRecovery", 2500.0, ["SE", "IR"]),
        ("TIRM", 2500.0, ["SE", "IR"]),
        ("TurboSpinEcho", None, ["SE"]),
        ("FLASH", None, ["GR"]),
        ("MPRAGE", 900.0, ["GR", "IR"]),
        ("EPI", None, ["EP"]),
        ("MyResearchSeq", None, ["RM"]),
    ],
)
def test_scanning_sequence_from_sequence_type(sequence_type, ti, expected):
    header = ScanHeader(sequence_type=sequence_type, ti=ti)
    assert scanning_sequence(header)[0] == expected


def test_uids_are_deterministic_and_follow_the_pixels(vol):
    a = build_series(vol.make_volume(seed=1))
    b = build_series(vol.make_volume(seed=1))
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert a[0].SeriesInstanceUID == b[0].SeriesInstanceUID
    changed = build_series(vol.make_volume(seed=2))
    assert changed[0].SeriesInstanceUID == a[0].SeriesInstanceUID
    assert not {d.SOPInstanceUID for d in changed} & {d.SOPInstanceUID for d in a}
    other = build_series(vol.make_volume(seed=1, series_index=1))
    assert other[0].SeriesInstanceUID != a[0].SeriesInstanceUID and other[0].SeriesNumber == 740001
    new_model = vol.make_volume(seed=1)
    new_model.provenance.model_version = "2024.04.0"
    assert build_series(new_model)[0].SeriesInstanceUID != a[0].SeriesInstanceUID
    for uid in [a[0].SeriesInstanceUID, *[d.SOPInstanceUID for d in a]]:
        assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid
    org = build_series(vol.make_volume(seed=1), uid_root="1.2.826.0.1.3680043.10.99.")
    assert all(d.SOPInstanceUID.startswith("1.2.826.0.1.3680043.10.99.") for d in org)
    assert all(len(d.SOPInstanceUID) <= 64 and d.SOPInstanceUID.is_valid for d in org)
    with pytest.raises(ValueError, match="uid_root"):
        make_uid("2.25", "x")


def test_missing_identifiers_give_research_placeholders(tmp_path, vol, validate):
    header = vol.make_header(patient_id=None, study_uid=None, patient_name=None)
    volume = vol.make_volume(header_xml=header)
    files = write_series(volume, tmp_path)
    # research data without a PatientID: the only finding is the DICOMDIR hint about it
    validate(files, accept=("needed to build DICOMDIR - Patient ID",))
    ds = pydicom.dcmread(files[0])
    assert ds.PatientID == "" and ds.PatientName == ""
    assert ds.StudyInstanceUID.startswith("2.25.") and GENERATED_STUDY_UID_NOTE in ds.ImageComments
    again = build_series(vol.make_volume(header_xml=header))[0]
    assert again.StudyInstanceUID == ds.StudyInstanceUID


def test_long_patient_name_and_odd_text_are_sanitised(tmp_path, vol, validate):
    name = "Bartholomew-Maximilian" * 3 + "^Alexandra\\Konstantina" + "^x" * 10
    header = vol.make_header(patient_name=name, accession="ACC-000123456789012345")
    files = write_series(vol.make_volume(header_xml=header), tmp_path)
    validate(files)
    ds = pydicom.dcmread(files[0])
    assert len(str(ds.PatientName)) <= 64 and str(ds.PatientName).startswith("Bartholomew-Maximilian")
    assert "\\" not in str(ds.PatientName)
    assert len(ds.AccessionNumber) <= 16


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: dataclasses.replace(v, magnitude=np.where(v.magnitude > 150, np.nan, v.magnitude)), "NaN"),
        (lambda v: dataclasses.replace(v, magnitude=np.zeros((0, 32, 32), np.float32), geometry=[]), "empty"),
        (lambda v: dataclasses.replace(v, geometry=[]), "geometr"),
        (
            lambda v: dataclasses.replace(
                v, geometry=[dataclasses.replace(g, read_dir=(0.0, 0.0, 0.0)) for g in v.geometry]
            ),
            "zero vector",
        ),
        (lambda v: dataclasses.replace(v, header_xml=""), "header is empty"),
        (lambda v: dataclasses.replace(v, header_xml="<ismrmrdHeader><oops"), "does not parse"),
        (lambda v: dataclasses.replace(v, magnitude=-v.magnitude), "non-negative"),
    ],
    ids=["nan", "empty", "no-geometry", "zero-direction", "no-header", "bad-header", "negative"],
)
def test_bad_input_raises_and_writes_nothing(tmp_path, vol, change, message):
    volume = change(vol.make_volume())
    with pytest.raises(ValueError, match=message):
        write_series(volume, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_failed_write_leaves_no_partial_file(tmp_path, vol, monkeypatch):
    ds = build_series(vol.make_volume())[0]
    target = tmp_path / "IM00001.dcm"
    write_atomic(ds, target)
    before = target.read_bytes()
    newer = build_series(vol.make_volume(seed=5))[0]

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(newer, target)
    monkeypatch.undo()
    assert target.read_bytes() == before  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["IM00001.dcm"]  # no temp file left
    assert pydicom.dcmread(Path(target)).SOPInstanceUID == ds.SOPInstanceUID
