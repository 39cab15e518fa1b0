"""The ISMRMRD raw data of a simulated subject: its XML header and its acquisitions.

Noise readouts come first (``NOISE_ACQUISITIONS`` of them), then every acquired phase-encode line
of every slice, with the flags a 2-D multi-slice Cartesian scan with embedded calibration sets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from ismrmrd import xsd
from xsdata.models.datatype import XmlDate, XmlTime

from recon_server.data.contrast import Sequence
from recon_server.mrd.ismrmrd_io import new_acquisition_headers

if TYPE_CHECKING:  # acquire.py writes the files, so it imports this module
    from recon_server.data.acquire import SimulatedSubject, SimulationConfig

NOISE_ACQUISITIONS = 4
LARMOR_3T_HZ = 127_740_000
BANDWIDTH_HZ_PER_PIXEL = 200.0


def _bit(flag: int) -> int:
    return 1 << (flag - 1)


FLAG_NOISE = _bit(19)  # ACQ_IS_NOISE_MEASUREMENT
FLAG_CALIBRATION = _bit(20)  # ACQ_IS_PARALLEL_CALIBRATION
FLAG_CALIBRATION_AND_IMAGING = _bit(21)  # ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING
FLAG_FIRST_IN_SLICE, FLAG_LAST_IN_SLICE = _bit(7), _bit(8)
FLAG_FIRST_IN_ENCODE_STEP1, FLAG_LAST_IN_ENCODE_STEP1 = _bit(1), _bit(2)
FLAG_LAST_IN_MEASUREMENT = _bit(25)


def build_header(subject: SimulatedSubject, *, acceleration: int) -> str:
    """The ISMRMRD XML header (schema classes of ismrmrd-python, so it validates by construction).

    encodedSpace: ``(os * nx, ny, 1)`` over ``(os * FOV, FOV, thickness)``; reconSpace
    ``(nx, ny, 1)`` over ``(FOV, FOV, thickness)``; limits for kspace_encoding_step_1 and slice
    with centres ``ny // 2`` and ``slices // 2``; parallel imaging ``R`` x 1, embedded calibration.
    """
    cfg, meta, seq = subject.config, subject.metadata, subject.sequence
    header = xsd.ismrmrdHeader(
        version=1,
        subjectInformation=xsd.subjectInformationType(
            patientName=str(meta["patient_name"]),
            patientWeight_kg=float(meta["patient_weight_kg"]),  # type: ignore[arg-type]
            patientID=str(meta["patient_id"]),
            patientBirthdate=XmlDate.from_string(str(meta["patient_birthdate"])),
            patientGender=str(meta["patient_sex"]),
        ),
        studyInformation=xsd.studyInformationType(
            studyDate=XmlDate.from_string(str(meta["study_date"])),
            studyTime=XmlTime.from_string(str(meta["study_time"])),
            studyID=str(meta["study_id"]),
            accessionNumber=int(meta["accession_number"]),  # type: ignore[call-overload]
            studyDescription="BRAIN STROKE (simulated)",
            studyInstanceUID=str(meta["study_instance_uid"]),
            bodyPartExamined="BRAIN",
        ),
        measurementInformation=xsd.measurementInformationType(
            measurementID=f"SIM{meta['seed']}_{meta['patient_id']}_{meta['study_id']}_{seq.protocol_name}",
            seriesDate=XmlDate.from_string(str(meta["study_date"])),
            seriesTime=XmlTime.from_string(str(meta["study_time"])),
            patientPosition=xsd.patientPositionType.HFS,
            initialSeriesNumber=1,
            protocolName=seq.protocol_name,
            sequenceName=seq.sequence_type,
            seriesDescription=seq.protocol_name.replace("_", " "),
            seriesInstanceUIDRoot=str(meta["series_instance_uid_root"]),
            frameOfReferenceUID=str(meta["frame_of_reference_uid"]),
        ),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor="recon-server simulator",
            systemModel="BrainSim",
            systemFieldStrength_T=3.0,
            relativeReceiverNoiseBandwidth=0.793,
            receiverChannels=cfg.coils,
            institutionName="Simulation",
            stationName="SIM3T",
        ),
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=LARMOR_3T_HZ),
        encoding=[_encoding(cfg, seq, acceleration)],
        sequenceParameters=xsd.sequenceParametersType(
            TR=[seq.TR],
            TE=[seq.TE],
            TI=[seq.TI] if seq.TI > 0 else [],
            flipAngle_deg=[seq.flip_deg],
            sequence_type=seq.sequence_type,
        ),
        userParameters=xsd.userParametersType(
            userParameterString=[xsd.userParameterStringType(name="contrast", value=seq.contrast)]
        ),
    )
    return xsd.ToXML(header)


def _encoding(cfg: SimulationConfig, seq: Sequence, acceleration: int) -> xsd.encodingType:
    """The header's one Cartesian encoding: spaces, limits and parallel imaging (see :func:`build_header`)."""
    n, s = cfg.matrix, cfg.slices
    nx_os = n * cfg.readout_oversampling

    def space(nx: int, fov_x: float) -> xsd.encodingSpaceType:
        return xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=nx, y=n, z=1),
            fieldOfView_mm=xsd.fieldOfViewMm(x=fov_x, y=cfg.fov_mm, z=cfg.slice_thickness_mm),
        )

    limits = xsd.encodingLimitsType(
        kspace_encoding_step_0=xsd.limitType(minimum=0, maximum=nx_os - 1, center=nx_os // 2),
        kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=n - 1, center=n // 2),
        kspace_encoding_step_2=xsd.limitType(minimum=0, maximum=0, center=0),
        slice=xsd.limitType(minimum=0, maximum=s - 1, center=s // 2),
        average=xsd.limitType(minimum=0, maximum=0, center=0),
        contrast=xsd.limitType(minimum=0, maximum=0, center=0),
        repetition=xsd.limitType(minimum=0, maximum=0, center=0),
    )
    return xsd.encodingType(
        encodedSpace=space(nx_os, cfg.fov_mm * cfg.readout_oversampling),
        reconSpace=space(n, cfg.fov_mm),
        encodingLimits=limits,
        trajectory=xsd.trajectoryType.CARTESIAN,
        parallelImaging=xsd.parallelImagingType(
            accelerationFactor=xsd.accelerationFactorType(
                kspace_encoding_step_1=acceleration, kspace_encoding_step_2=1
            ),
            calibrationMode=xsd.calibrationModeType.EMBEDDED,
        ),
        echoTrainLength=1 if seq.sequence_type == "SpinEcho" else 16,
    )


def acquisitions(subject: SimulatedSubject, *, undersampled: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """Acquisition headers and data: noise readouts first, then the imaging and calibration lines.

    Order: for each phase-encode line (ascending), each slice in interleaved order (0, 2, ... 1, 3,
    ...), as a 2-D multi-slice sequence runs. Flags: NOISE_MEASUREMENT; in the undersampled file
    PARALLEL_CALIBRATION_AND_IMAGING for the ACS lines (with ``acs_calibration_only``: only for
    those on the sampling grid, PARALLEL_CALIBRATION for the others); FIRST/LAST_IN_SLICE,
    FIRST/LAST_IN_ENCODE_STEP1, LAST_IN_MEASUREMENT.
    """
    cfg = subject.config
    ny, nx_os = subject.kspace.shape[-2:]
    lines = np.flatnonzero(subject.lines) if undersampled else np.arange(ny)
    order = [*range(0, cfg.slices, 2), *range(1, cfg.slices, 2)]
    n_img = len(lines) * cfg.slices
    heads = new_acquisition_headers(NOISE_ACQUISITIONS + n_img)
    dwell_us = 1e6 / (BANDWIDTH_HZ_PER_PIXEL * nx_os)
    heads["measurement_uid"] = int(subject.metadata["measurement_uid"])  # type: ignore[call-overload]
    heads["available_channels"] = cfg.coils
    heads["active_channels"] = cfg.coils
    heads["number_of_samples"] = nx_os
    heads["center_sample"] = nx_os // 2
    heads["sample_time_us"] = dwell_us
    heads["scan_counter"] = np.arange(1, len(heads) + 1)
    tr_ticks = max(1, round(subject.sequence.TR / 2.5 / cfg.slices))  # 2.5 ms clock ticks
    heads["acquisition_time_stamp"] = 1_000_000 + np.arange(len(heads)) * tr_ticks
    data: list[np.ndarray] = []
    noise = subject.noise.reshape(cfg.coils, NOISE_ACQUISITIONS, -1)
    for k in range(NOISE_ACQUISITIONS):
        heads[k]["flags"] = FLAG_NOISE
        heads[k]["sample_time_us"] = dwell_us
        data.append(noise[:, k, :])
    in_acs = np.zeros(ny, dtype=bool)
    in_acs[subject.acs[0] : subject.acs[1]] = True
    row = NOISE_ACQUISITIONS
    for li, ky in enumerate(lines):
        for sl in order:
            h = heads[row]
            flags = 0
            if undersampled and in_acs[ky]:
                calib_only = cfg.acs_calibration_only and not subject.imaging_lines[ky]
                flags |= FLAG_CALIBRATION if calib_only else FLAG_CALIBRATION_AND_IMAGING
            if li == 0:
                flags |= FLAG_FIRST_IN_SLICE | FLAG_FIRST_IN_ENCODE_STEP1
            if li == len(lines) - 1:
                flags |= FLAG_LAST_IN_SLICE | FLAG_LAST_IN_ENCODE_STEP1
            h["flags"] = flags
            h["idx"]["kspace_encode_step_1"] = ky
            h["idx"]["slice"] = sl
            g = subject.geometry[sl]
            h["position"], h["read_dir"] = g.position, g.read_dir
            h["phase_dir"], h["slice_dir"] = g.phase_dir, g.slice_dir
            data.append(subject.kspace[sl, :, ky, :])
            row += 1
    heads[-1]["flags"] |= FLAG_LAST_IN_MEASUREMENT
    return heads, data
