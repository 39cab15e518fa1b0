"""Readouts as the assembler reads them: the flags it acts on, the header fields it needs, and
Gadgetron ReconData buffers unpacked into readouts (:func:`buffer_readouts`)."""

from __future__ import annotations

from collections.abc import Iterator

import ismrmrd
import numpy as np

from recon_server.mrd import wire
from recon_server.mrd.ismrmrd_io import ACQUISITION_HEADER_DTYPE, field_reader


def _bit(flag: int) -> int:
    return 1 << (flag - 1)


NOISE = _bit(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
CALIBRATION = _bit(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
CALIBRATION_AND_IMAGING = _bit(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
IGNORED = (
    _bit(ismrmrd.ACQ_IS_NAVIGATION_DATA)
    | _bit(ismrmrd.ACQ_IS_PHASECORR_DATA)
    | _bit(ismrmrd.ACQ_IS_HPFEEDBACK_DATA)
    | _bit(ismrmrd.ACQ_IS_DUMMYSCAN_DATA)
    | _bit(ismrmrd.ACQ_IS_RTFEEDBACK_DATA)
    | _bit(ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA)
    | _bit(ismrmrd.ACQ_IS_PHASE_STABILIZATION_REFERENCE)
    | _bit(ismrmrd.ACQ_IS_PHASE_STABILIZATION)
)
#: The header fields every readout needs, read in one call (numpy record fields are slow).
LINE_FIELDS = field_reader(
    ACQUISITION_HEADER_DTYPE,
    [
        "flags",
        "center_sample",
        "encoding_space_ref",
        "sample_time_us",
        "idx.kspace_encode_step_1",
        "idx.average",
        "idx.slice",
        "idx.contrast",
        "idx.repetition",
    ],
)


def buffer_readouts(
    buf: wire.ReconBuffer, *, calibration: bool, ky_offset: int
) -> Iterator[tuple[np.void | np.ndarray, np.ndarray]]:
    """``(head, data (coils, samples))`` of every non-empty line of a ReconData buffer, in order.

    Lines of the ``ref`` buffer (``calibration``) are flagged calibration only, those of the
    ``data`` buffer lose that flag; a header row the buffer left empty gets the line's position.
    """
    data = buf.data
    if data.ndim != 7:
        raise ValueError(f"ReconData buffer must be 7-D [E0,E1,E2,CHA,N,S,LOC], got shape {data.shape}")
    e0, e1, e2, cha, n_n, n_s, n_loc = data.shape
    headers = buf.headers.reshape(buf.headers.shape + (1,) * (5 - buf.headers.ndim))
    if headers.shape != (e1, e2, n_n, n_s, n_loc):
        raise ValueError(f"ReconData headers of shape {buf.headers.shape} do not match data {data.shape}")
    filled = np.abs(data).sum(axis=(0, 3)) > 0  # (E1, E2, N, S, LOC)
    for i1, i2, n, s, loc in zip(*np.nonzero(filled), strict=True):
        head = np.array(headers[i1, i2, n, s, loc], dtype=headers.dtype)[()]
        line = np.ascontiguousarray(data[:, i1, i2, :, n, s, loc].T)
        if int(head["number_of_samples"]) == 0:  # header row not filled: use the buffer position
            head["idx"]["kspace_encode_step_1"] = i1 - ky_offset
            head["idx"]["slice"] = loc
        head["number_of_samples"], head["active_channels"] = e0, cha
        if calibration:
            # Gadgetron's reference buffer repeats the data buffer's calibration-and-imaging
            # lines: calibration only here (as data they would be counted twice).
            head["flags"] = (int(head["flags"]) | CALIBRATION) & ~CALIBRATION_AND_IMAGING
        else:
            head["flags"] = int(head["flags"]) & ~CALIBRATION
        yield head, line
