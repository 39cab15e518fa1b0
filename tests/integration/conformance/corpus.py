"""Raw files laid out as scanners send them, written with ismrmrd-python's ``Dataset`` API.

One simulated two-slice FLAIR subject (the project's simulator gives the noiseless truth, the coil
maps and the noisy oversampled k-space of every line); each :func:`write_case` writes the lines
of one acquisition convention with the flags, indices, encoding limits and encodings a scanner
(siemens_to_ismrmrd) would use. The writer is ismrmrd-python's, not the project's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ismrmrd
import numpy as np
from ismrmrd import xsd

from recon_server.data.acquire import SimulatedSubject

ACQ_CALIBRATION = ismrmrd.ACQ_IS_PARALLEL_CALIBRATION
ACQ_CALIBRATION_AND_IMAGING = ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING
DWELL_US = 5.0


@dataclass
class Line:
    """One readout to write: k-space row ``ky`` (full-grid index) of slice ``slice``."""

    slice: int
    ky: int
    data: np.ndarray  # (coils, samples)
    flags: tuple[int, ...] = ()
    centre: int | None = None  # center_sample; None: samples // 2
    average: int = 0
    encoding_ref: int = 0
    e1: int | None = None  # kspace_encode_step_1 written; None: ky
    dwell_us: float = DWELL_US


@dataclass
class Layout:
    """What a case writes: lines (in acquisition order), header changes, the imaging rows."""

    lines: list[Line]
    mode: str = "embedded"
    e1_limits: tuple[int, int, int] | None = None  # (minimum, maximum, center)
    reference: tuple[int, int, int] | None = None  # second encoding (encoded nx, ny, recon nx)
    noise_dwell_us: float = DWELL_US
    noise_gain: float = 1.0
    notes: dict[str, object] = field(default_factory=dict)


def grid_rows(ny: int, r: int) -> np.ndarray:
    """Equispaced phase-encode rows of an R-fold grid that includes the centre row."""
    return np.arange(ny // 2 % r, ny, r)


def acs_rows(ny: int, n: int) -> np.ndarray:
    return np.arange(ny // 2 - n // 2, ny // 2 - n // 2 + n)


def _embedded(sub: SimulatedSubject, r: int, n_acs: int, *, scanner_flags: bool, acs_last: bool) -> Layout:
    ny = sub.kspace.shape[-2]
    grid, acs = set(grid_rows(ny, r).tolist()), set(acs_rows(ny, n_acs).tolist())
    imaging: list[Line] = []
    calibration: list[Line] = []
    for s in range(sub.kspace.shape[0]):
        for ky in sorted(grid | acs):
            on_grid, in_acs = ky in grid, ky in acs
            if not scanner_flags:
                flags: tuple[int, ...] = (ACQ_CALIBRATION_AND_IMAGING,) if in_acs else ()
            elif in_acs:
                flags = (ACQ_CALIBRATION_AND_IMAGING,) if on_grid else (ACQ_CALIBRATION,)
            else:
                flags = ()
            line = Line(s, ky, sub.kspace[s, :, ky], flags)
            (calibration if in_acs and not on_grid and acs_last else imaging).append(line)
    return Layout(imaging + calibration)


def embedded_scanner(sub: SimulatedSubject) -> Layout:
    """GRAPPA-style R=4, 16 ACS lines: off-grid ones calibration only, in acquisition order."""
    return _embedded(sub, 4, 16, scanner_flags=True, acs_last=False)


def embedded_scanner_acs_last(sub: SimulatedSubject) -> Layout:
    """The same lines, the calibration-only ones sent after every imaging line."""
    return _embedded(sub, 4, 16, scanner_flags=True, acs_last=True)


def embedded_all_imaging(sub: SimulatedSubject) -> Layout:
    """The same lines as :func:`embedded_scanner`, every one flagged as imaging (fastMRI style)."""
    return _embedded(sub, 4, 16, scanner_flags=False, acs_last=False)


def separate_same_encoding(sub: SimulatedSubject) -> Layout:
    """A reference scan of 24 central lines (calibration only) before an R=2 scan with no centre."""
    ny = sub.kspace.shape[-2]
    lines = []
    for s in range(sub.kspace.shape[0]):
        lines += [Line(s, ky, sub.kspace[s, :, ky], (ACQ_CALIBRATION,)) for ky in acs_rows(ny, 24)]
    for s in range(sub.kspace.shape[0]):
        lines += [Line(s, ky, sub.kspace[s, :, ky]) for ky in grid_rows(ny, 2)]
    return Layout(lines, mode="separate")


def separate_own_encoding(sub: SimulatedSubject) -> Layout:
    """A low-resolution reference scan of its own encoding (half the readout, 24 lines, same FOV)."""
    _, _, ny, nx_os = sub.kspace.shape
    ref_nx_os, ref_ny = nx_os // 2, 24
    c0 = nx_os // 2 - ref_nx_os // 2
    rows = acs_rows(ny, ref_ny)
    lines = []
    for s in range(sub.kspace.shape[0]):
        for i, ky in enumerate(rows):
            data = sub.kspace[s, :, ky, c0 : c0 + ref_nx_os]
            lines.append(Line(s, ky, data, (ACQ_CALIBRATION,), encoding_ref=1, e1=i))
    for s in range(sub.kspace.shape[0]):
        lines += [Line(s, ky, sub.kspace[s, :, ky]) for ky in grid_rows(ny, 2)]
    return Layout(lines, mode="separate", reference=(ref_nx_os, ref_ny, ref_nx_os // 2))


def fully_sampled_centre(sub: SimulatedSubject) -> Layout:
    """No calibration flags at all: R=4 grid plus a fully sampled centre of 16 lines."""
    ny = sub.kspace.shape[-2]
    rows = sorted(set(grid_rows(ny, 4).tolist()) | set(acs_rows(ny, 16).tolist()))
    lines = [Line(s, ky, sub.kspace[s, :, ky]) for s in range(sub.kspace.shape[0]) for ky in rows]
    return Layout(lines, mode="")


def no_calibration(sub: SimulatedSubject) -> Layout:
    """R=2 without any calibration or fully sampled centre (coil maps cannot be estimated)."""
    ny = sub.kspace.shape[-2]
    lines = [Line(s, ky, sub.kspace[s, :, ky]) for s in range(sub.kspace.shape[0]) for ky in grid_rows(ny, 2)]
    return Layout(lines, mode="")


def partial_fourier(sub: SimulatedSubject) -> Layout:
    """5/8 partial Fourier in phase with R=2 and 16 ACS lines: the first 3/8 of rows not measured.

    As siemens_to_ismrmrd writes it: lines numbered from 0 at the first measured row, the
    encoding limits' centre is the number of the k-space centre row.
    """
    ny = sub.kspace.shape[-2]
    first = ny * 3 // 8
    rows = sorted(set(grid_rows(ny, 2).tolist()) | set(acs_rows(ny, 16).tolist()))
    rows = [ky for ky in rows if ky >= first]
    lines = []
    for s in range(sub.kspace.shape[0]):
        for ky in rows:
            flags = (ACQ_CALIBRATION_AND_IMAGING,) if ky in acs_rows(ny, 16) else ()
            lines.append(Line(s, ky, sub.kspace[s, :, ky], flags, e1=ky - first))
    return Layout(lines, e1_limits=(0, ny - 1 - first, ny // 2 - first))


def asymmetric_echo(sub: SimulatedSubject) -> Layout:
    """Partial Fourier in readout: the first 20% of the (oversampled) readout not sampled."""
    layout = embedded_scanner(sub)
    nx_os = sub.kspace.shape[-1]
    skip = nx_os // 5
    for line in layout.lines:
        line.data = line.data[:, skip:]
        line.centre = nx_os // 2 - skip
    layout.notes["skip"] = skip
    return layout


def averages(sub: SimulatedSubject) -> Layout:
    """Two averages of every line (``idx.average`` 0 and 1), the second with its own noise."""
    layout = embedded_scanner(sub)
    rng = np.random.default_rng(7)
    sigma = float(np.std(sub.noise))
    second = []
    for line in layout.lines:
        extra = (
            (rng.standard_normal(line.data.shape) + 1j * rng.standard_normal(line.data.shape))
            * sigma
            / np.sqrt(2)
        )
        second.append(
            Line(line.slice, line.ky, (line.data + extra).astype(np.complex64), line.flags, average=1)
        )
    layout.lines = [x for pair in zip(layout.lines, second, strict=True) for x in pair]
    return layout


def interleaved_slices(sub: SimulatedSubject) -> Layout:
    """Slices acquired in reverse order, lines of both slices alternating."""
    layout = embedded_scanner(sub)
    layout.lines.sort(key=lambda line: (line.ky, -line.slice))
    return layout


def noise_dwell(sub: SimulatedSubject) -> Layout:
    """A noise scan with twice the imaging dwell time (half the bandwidth: half the variance)."""
    layout = embedded_scanner(sub)
    layout.noise_dwell_us = 2 * DWELL_US
    layout.noise_gain = 1 / np.sqrt(2)
    return layout


CASES: dict[str, Callable[[SimulatedSubject], Layout]] = {
    "embedded-scanner-flags": embedded_scanner,
    "embedded-acs-last": embedded_scanner_acs_last,
    "embedded-all-imaging": embedded_all_imaging,
    "separate-same-encoding": separate_same_encoding,
    "separate-own-encoding": separate_own_encoding,
    "fully-sampled-centre": fully_sampled_centre,
    "no-calibration": no_calibration,
    "partial-fourier-phase": partial_fourier,
    "asymmetric-echo": asymmetric_echo,
    "averages": averages,
    "interleaved-slices": interleaved_slices,
    "noise-dwell-time": noise_dwell,
}


def _encoding(nx_os: int, ny: int, nx: int, fov: float, thickness: float, slices: int) -> xsd.encodingType:
    def space(x: int, fov_x: float) -> xsd.encodingSpaceType:
        return xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=x, y=ny, z=1),
            fieldOfView_mm=xsd.fieldOfViewMm(x=fov_x, y=fov, z=thickness),
        )

    limits = xsd.encodingLimitsType(
        kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=ny - 1, center=ny // 2),
        slice=xsd.limitType(minimum=0, maximum=slices - 1, center=0),
        average=xsd.limitType(minimum=0, maximum=1, center=0),
    )
    return xsd.encodingType(
        encodedSpace=space(nx_os, fov * nx_os / nx),
        reconSpace=space(nx, fov),
        encodingLimits=limits,
        trajectory=xsd.trajectoryType.CARTESIAN,
    )


def header_xml(sub: SimulatedSubject, layout: Layout, *, r: int) -> str:
    slices, coils, ny, nx_os = sub.kspace.shape
    nx = sub.truth.shape[-1]
    fov, thickness = float(sub.config.fov_mm), float(sub.config.slice_thickness_mm)
    enc = _encoding(nx_os, ny, nx, fov, thickness, slices)
    if layout.e1_limits is not None:
        lo, hi, centre = layout.e1_limits
        enc.encodingLimits.kspace_encoding_step_1 = xsd.limitType(minimum=lo, maximum=hi, center=centre)
    if layout.mode:
        mode = (
            xsd.calibrationModeType.SEPARATE
            if layout.mode == "separate"
            else xsd.calibrationModeType.EMBEDDED
        )
        enc.parallelImaging = xsd.parallelImagingType(
            accelerationFactor=xsd.accelerationFactorType(kspace_encoding_step_1=r, kspace_encoding_step_2=1),
            calibrationMode=mode,
        )
    encodings = [enc]
    if layout.reference is not None:
        ref_nx_os, ref_ny, ref_nx = layout.reference
        encodings.append(_encoding(ref_nx_os, ref_ny, ref_nx, fov, thickness, slices))
    header = xsd.ismrmrdHeader(
        version=1,
        encoding=encodings,
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(receiverChannels=coils),
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=127_740_000),
        measurementInformation=xsd.measurementInformationType(
            measurementID="conformance",
            protocolName="AX FLAIR conformance",
            patientPosition=xsd.patientPositionType.HFS,
        ),
        subjectInformation=xsd.subjectInformationType(patientName="CONFORMANCE^TEST", patientID="CONF01"),
    )
    return xsd.ToXML(header)


def write_case(path: Path, sub: SimulatedSubject, layout: Layout, *, r: int = 4) -> Path:
    """Write ``layout`` of ``sub`` as an ISMRMRD raw file (noise scan first) with ismrmrd-python."""
    path.unlink(missing_ok=True)
    dset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    dset.write_xml_header(header_xml(sub, layout, r=r))
    counter = 0

    def append(data: np.ndarray, flags: tuple[int, ...], dwell_us: float, line: Line | None = None) -> None:
        nonlocal counter
        acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64))
        acq.sample_time_us = dwell_us
        acq.scan_counter = counter
        acq.acquisition_time_stamp = 1000 + 2 * counter
        acq.measurement_uid = 4242
        acq.patient_table_position[:] = (0.0, 0.0, -1200.0)
        counter += 1
        for flag in flags:
            acq.set_flag(flag)
        if line is not None:
            samples = line.data.shape[-1]
            acq.center_sample = samples // 2 if line.centre is None else line.centre
            acq.encoding_space_ref = line.encoding_ref
            acq.idx.kspace_encode_step_1 = line.ky if line.e1 is None else line.e1
            acq.idx.slice, acq.idx.average = line.slice, line.average
            geom = sub.geometry[line.slice]
            acq.position[:] = geom.position
            acq.read_dir[:], acq.phase_dir[:], acq.slice_dir[:] = (
                geom.read_dir,
                geom.phase_dir,
                geom.slice_dir,
            )
        dset.append_acquisition(acq)

    append(sub.noise * layout.noise_gain, (ismrmrd.ACQ_IS_NOISE_MEASUREMENT,), layout.noise_dwell_us)
    for line in layout.lines:
        append(line.data, line.flags, line.dwell_us, line)
    dset.close()
    return path
