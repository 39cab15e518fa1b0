"""DICOM strings under ISO_IR 192: limits count UTF-8 bytes, cuts fall on character boundaries,
control and bidirectional characters never reach a dataset."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from recon_server.dicom.writer import dicom_series_description, write_series

from .conftest import run_validator

JAPANESE_30 = "国立循環器病研究センター病院放射線部磁気共鳴画像診断室第二室"  # 30 characters
BIDI = "\u202e\u2066\u200f"


def _utf8(header: str) -> str:
    """The test header as a scanner sends it: declared UTF-8 (ismrmrd's ToXML says ascii)."""
    return header.replace('encoding="ascii"', 'encoding="UTF-8"')


def test_thirty_japanese_characters_in_institution_name(tmp_path: Path, vol) -> None:  # type: ignore[no-untyped-def]
    assert len(JAPANESE_30) == 30 and len(JAPANESE_30.encode()) == 90
    header = _utf8(vol.make_header()).replace("General Hospital", JAPANESE_30)
    header = header.replace("MRC12345", "東京第一")  # SH 16: 12 bytes, fits
    header = header.replace("t2_tirm_tra_dark-fluid", "脳" * 40 + BIDI + "x")
    volume = vol.make_volume(header_xml=header)
    volume = type(volume)(**{**volume.__dict__, "series_description": "軸位" * 40})
    files = write_series(volume, tmp_path)
    for path in files:
        lines = run_validator("dciodvfy", [path])
        assert [ln for ln in lines if ln.startswith("Error")] == [], lines
    ds = pydicom.dcmread(files[0])
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    institution = ds.InstitutionName
    assert len(institution.encode()) <= 64 and JAPANESE_30.startswith(institution)
    assert len(institution) == 21  # 21 x 3 bytes = 63: the 22nd character would cut through
    assert ds.StationName == "東京第一"
    contributing = ds.ContributingEquipmentSequence[0]
    assert contributing.InstitutionName == institution
    for value in (ds.ProtocolName, ds.SeriesDescription):
        assert len(value.encode()) <= 64 and value.encode().decode() == value
        assert not any(ch in value for ch in BIDI)
    assert ds.SeriesDescription.endswith("[AI recon: dps]")


def test_bidi_and_control_characters_are_removed_from_displayed_strings(vol) -> None:  # type: ignore[no-untyped-def]
    volume = vol.make_volume()
    volume = type(volume)(**{**volume.__dict__, "series_description": "FLAIR\u202e tra\n\x85"})
    text = dicom_series_description(volume)
    assert text == "FLAIR tra [AI recon: dps]"


@pytest.mark.parametrize("name", ["山田^太郎" * 10, "Doe" * 30 + "^" + "名" * 30])
def test_person_names_fit_64_bytes(tmp_path: Path, vol, name: str) -> None:  # type: ignore[no-untyped-def]
    header = _utf8(vol.make_header(patient_name=name))
    files = write_series(vol.make_volume(header_xml=header), tmp_path)
    ds = pydicom.dcmread(files[0])
    value = str(ds.PatientName)
    assert 0 < len(value.encode()) <= 64
    lines = run_validator("dciodvfy", [files[0]])
    assert [ln for ln in lines if ln.startswith("Error")] == [], lines
