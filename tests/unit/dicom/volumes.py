"""Test ImageVolumes with ISMRMRD headers built from the ismrmrd.xsd dataclasses.

Loaded by path from the unit and integration conftest files (pytest runs with
--import-mode=importlib, so test folders are not packages).
"""

from __future__ import annotations

import numpy as np
from ismrmrd import xsd

from recon_server.scan import ImageVolume, Provenance, SliceGeometry

STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
FRAME_UID = "1.2.826.0.1.3680043.8.498.1002"


def make_header(
    *,
    flair: bool = True,
    patient_name: str | None = "Doe^Jane",
    patient_id: str | None = "PAT-0001",
    study_uid: str | None = STUDY_UID,
    accession: str = "00A123",
    rows: int = 32,
    cols: int = 32,
) -> str:
    """An ISMRMRD XML header; ``flair`` adds TI (T1 otherwise). ``None`` omits a field."""
    hdr = xsd.ismrmrdHeader(
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=123_251_815)
    )
    hdr.subjectInformation = xsd.subjectInformationType(
        patientName=patient_name, patientID=patient_id, patientBirthdate="1961-07-04", patientGender="F"
    )
    hdr.studyInformation = xsd.studyInformationType(
        studyDate="2024-03-05",
        studyTime="08:15:30",
        studyID="4711",
        referringPhysicianName="House^Gregory",
        studyInstanceUID=study_uid,
        accessionNumber=1,  # replaced below by a string accession number
        bodyPartExamined="BRAIN" if flair else None,
    )
    hdr.measurementInformation = xsd.measurementInformationType(
        measurementID="45123_77001_77002_7",
        seriesDate="2024-03-05",
        seriesTime="08:31:02.250",
        patientPosition=xsd.patientPositionType.HFS,
        initialSeriesNumber=7,
        protocolName="t2_tirm_tra_dark-fluid" if flair else "t1_se_tra",
        frameOfReferenceUID=FRAME_UID,
        seriesDescription="FLAIR tra" if flair else "T1 tra",
    )
    hdr.acquisitionSystemInformation = xsd.acquisitionSystemInformationType(
        systemVendor="SIEMENS",
        systemModel="Prisma",
        systemFieldStrength_T=2.89362,
        institutionName="General Hospital",
        stationName="MRC12345",
        deviceSerialNumber="123456",
    )
    hdr.sequenceParameters = xsd.sequenceParametersType(
        TR=[9000.0] if flair else [500.0],
        TE=[81.0] if flair else [12.0],
        TI=[2500.0] if flair else [],
        flipAngle_deg=[150.0] if flair else [90.0],
        sequence_type="TurboSpinEcho" if flair else "SpinEcho",
        echo_spacing=[9.0],
    )
    space = xsd.encodingSpaceType(
        matrixSize=xsd.matrixSizeType(x=cols, y=rows, z=1),
        fieldOfView_mm=xsd.fieldOfViewMm(x=220.0, y=220.0, z=5.0),
    )
    hdr.encoding = [
        xsd.encodingType(
            encodedSpace=space,
            reconSpace=space,
            encodingLimits=xsd.encodingLimitsType(),
            trajectory=xsd.trajectoryType.CARTESIAN,
            echoTrainLength=16 if flair else 1,
        )
    ]
    xml = xsd.ToXML(hdr)
    return xml.replace(
        "<accessionNumber>1</accessionNumber>", f"<accessionNumber>{accession}</accessionNumber>"
    )


def rotation(theta_deg: float, phi_deg: float) -> np.ndarray:
    """Orthonormal (read, phase, slice) rows: rotation about z by theta, then about x by phi."""
    t, p = np.deg2rad(theta_deg), np.deg2rad(phi_deg)
    rz = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    return (rx @ rz).T  # rows are the rotated x, y, z axes


def make_geometry(
    n_slices: int, *, oblique: bool = False, gap_mm: float = 6.0, fov=(220.0, 220.0, 5.0)
) -> list[SliceGeometry]:
    """Slice stack: axial (read=L, phase=P, slice=S in LPS) or oblique (20 deg, -15 deg)."""
    axes = rotation(20.0, -15.0) if oblique else np.eye(3)
    read, phase, normal = axes
    centre = np.array([3.5, -12.25, 40.0])
    geometry = []
    for i in range(n_slices):
        pos = centre + (i - (n_slices - 1) / 2) * gap_mm * normal
        geometry.append(
            SliceGeometry(
                position=tuple(float(v) for v in pos),
                read_dir=tuple(float(v) for v in read),
                phase_dir=tuple(float(v) for v in phase),
                slice_dir=tuple(float(v) for v in normal),
                fov_mm=tuple(float(v) for v in fov),
                slice_index=i,
            )
        )
    return geometry


def make_volume(
    *,
    n_slices: int = 4,
    rows: int = 32,
    cols: int = 32,
    oblique: bool = False,
    flair: bool = True,
    seed: int = 0,
    header_xml: str | None = None,
    model: bool = True,
    series_index: int = 0,
    fov_xy: tuple[float, float] | None = None,
) -> ImageVolume:
    """A small random magnitude volume with a matching header and geometry."""
    rng = np.random.default_rng(seed)
    magnitude = rng.gamma(2.0, 50.0, size=(n_slices, rows, cols)).astype(np.float32)
    fov = (*fov_xy, 5.0) if fov_xy else (220.0, 220.0 * rows / cols, 5.0)
    prov = Provenance(
        method="dps",
        settings={"steps": 50},
        model_name="flair-dpm" if model else "",
        model_version="2024.03.1" if model else "",
        software_version="0.1.0",
    )
    return ImageVolume(
        magnitude=magnitude,
        geometry=make_geometry(n_slices, oblique=oblique, fov=fov),
        header_xml=header_xml if header_xml is not None else make_header(flair=flair, rows=rows, cols=cols),
        provenance=prov,
        series_description="FLAIR tra" if flair else "T1 tra",
        window_center=float(np.percentile(magnitude, 50)),
        window_width=float(np.percentile(magnitude, 99) - np.percentile(magnitude, 1)),
        series_index=series_index,
        contrast="FLAIR" if flair else "T1",
        measurement_id="45123_77001_77002_7",
    )
