"""The DICOM-relevant fields of an ISMRMRD XML header, parsed once and normalised.

Dates become ``YYYYMMDD``, times ``HHMMSS[.ffffff]``, sex ``M``/``F``/``O``/``""``. The
schema types ``accessionNumber`` as an integer but real accession numbers are strings (with
leading zeros or letters), so it is read from the raw XML text instead.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import ismrmrd.xsd

_NS = "{http://www.ismrm.org/ISMRMRD}"
_MAX_HEADER_CHARS = 10_000_000


@dataclass(frozen=True)
class ScanHeader:
    """Header values used by the writer; empty strings / None where the header has none."""

    patient_name: str = ""
    patient_id: str = ""
    birth_date: str = ""
    sex: str = ""
    study_uid: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    referring_physician: str = ""
    study_id: str = ""
    study_description: str = ""
    body_part: str = ""
    measurement_id: str = ""
    series_date: str = ""
    series_time: str = ""
    series_number: int = 0
    protocol_name: str = ""
    sequence_name: str = ""
    frame_of_reference_uid: str = ""
    patient_position: str = "HFS"
    series_description: str = ""
    vendor: str = ""
    model: str = ""
    field_strength_t: float | None = None
    institution: str = ""
    station: str = ""
    serial_number: str = ""
    larmor_mhz: float | None = None
    tr: float | None = None
    te: float | None = None
    ti: float | None = None
    flip_angle: float | None = None
    sequence_type: str = ""
    echo_spacing: float | None = None
    trajectory: str = ""
    matrix_z: int = 1
    echo_train_length: int | None = None


def _date(value: object) -> str:
    """XmlDate / ``YYYY-MM-DD`` -> ``YYYYMMDD`` ("" when absent or malformed)."""
    if value is None:
        return ""
    match = re.match(r"^(\d{4})-?(\d{2})-?(\d{2})", str(value))
    return "".join(match.groups()) if match else ""


def _time(value: object) -> str:
    """XmlTime / ``HH:MM:SS(.ffffff)`` -> ``HHMMSS(.ffffff)``, time zone dropped."""
    if value is None:
        return ""
    match = re.match(r"^(\d{2}):?(\d{2}):?(\d{2})(\.\d{1,6})?", str(value))
    if not match:
        return ""
    return "".join(match.groups(default=""))


def _sex(value: str | None) -> str:
    text = (value or "").strip().upper()
    return {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}.get(text, "O" if text else "")


def _uid(value: str | None) -> str:
    text = (value or "").strip().rstrip("\x00")
    return text if re.fullmatch(r"[0-9.]{1,64}", text) and ".." not in text else ""


def _first(values: list[float]) -> float | None:
    return float(values[0]) if values else None


def _accession_text(xml: str) -> str:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return ""
    node = root.find(f"{_NS}studyInformation/{_NS}accessionNumber")
    if node is None:
        node = root.find("studyInformation/accessionNumber")
    return (node.text or "").strip() if node is not None else ""


def parse_header(xml: str) -> ScanHeader:
    """Parse an ISMRMRD XML header (trailing NULs allowed) into a :class:`ScanHeader`."""
    if not isinstance(xml, str) or not xml.strip("\x00 \n\t"):
        raise ValueError("ISMRMRD header is empty: cannot write DICOM without the scan header")
    if len(xml) > _MAX_HEADER_CHARS:
        raise ValueError(f"ISMRMRD header is {len(xml)} characters, over the {_MAX_HEADER_CHARS} limit")
    xml = xml.rstrip("\x00")
    accession = _accession_text(xml)
    # the schema wants an integer accession number; parse without it and keep the text
    parse_xml = re.sub(r"<accessionNumber>.*?</accessionNumber>", "", xml, flags=re.S)
    try:
        hdr = ismrmrd.xsd.CreateFromDocument(parse_xml)
    except Exception as exc:  # noqa: BLE001 - xsdata raises several unrelated exception types
        raise ValueError(f"ISMRMRD header does not parse: {exc}") from exc
    subject, study = hdr.subjectInformation, hdr.studyInformation
    meas, system = hdr.measurementInformation, hdr.acquisitionSystemInformation
    seq = hdr.sequenceParameters
    enc = hdr.encoding[0] if hdr.encoding else None
    position = "HFS"
    if meas is not None and meas.patientPosition is not None:
        position = getattr(meas.patientPosition, "value", str(meas.patientPosition))
    larmor = None
    if hdr.experimentalConditions is not None and hdr.experimentalConditions.H1resonanceFrequency_Hz:
        larmor = hdr.experimentalConditions.H1resonanceFrequency_Hz / 1e6
    return ScanHeader(
        patient_name=(subject.patientName or "") if subject else "",
        patient_id=(subject.patientID or "").strip() if subject else "",
        birth_date=_date(subject.patientBirthdate) if subject else "",
        sex=_sex(subject.patientGender) if subject else "",
        study_uid=_uid(study.studyInstanceUID) if study else "",
        study_date=_date(study.studyDate) if study else "",
        study_time=_time(study.studyTime) if study else "",
        accession_number=accession,
        referring_physician=(study.referringPhysicianName or "") if study else "",
        study_id=(study.studyID or "") if study else "",
        study_description=(study.studyDescription or "") if study else "",
        body_part=(study.bodyPartExamined or "") if study else "",
        measurement_id=(meas.measurementID or "") if meas else "",
        series_date=_date(meas.seriesDate) if meas else "",
        series_time=_time(meas.seriesTime) if meas else "",
        series_number=int(meas.initialSeriesNumber or 0) if meas else 0,
        protocol_name=(meas.protocolName or "") if meas else "",
        sequence_name=(meas.sequenceName or "") if meas else "",
        frame_of_reference_uid=_uid(meas.frameOfReferenceUID) if meas else "",
        patient_position=position,
        series_description=(meas.seriesDescription or "") if meas else "",
        vendor=(system.systemVendor or "") if system else "",
        model=(system.systemModel or "") if system else "",
        field_strength_t=system.systemFieldStrength_T if system else None,
        institution=(system.institutionName or "") if system else "",
        station=(system.stationName or "") if system else "",
        serial_number=(system.deviceSerialNumber or "") if system else "",
        larmor_mhz=larmor,
        tr=_first(seq.TR) if seq else None,
        te=_first(seq.TE) if seq else None,
        ti=_first(seq.TI) if seq else None,
        flip_angle=_first(seq.flipAngle_deg) if seq else None,
        sequence_type=(seq.sequence_type or "") if seq else "",
        echo_spacing=_first(seq.echo_spacing) if seq else None,
        trajectory=getattr(enc.trajectory, "value", "") if enc else "",
        matrix_z=int(enc.encodedSpace.matrixSize.z) if enc else 1,
        echo_train_length=enc.echoTrainLength if enc else None,
    )
