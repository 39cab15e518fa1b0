"""Acquisitions (or Gadgetron ReconData) -> one :class:`KSpaceScan` per (contrast, repetition).

Feed an :class:`Assembler` the readouts as they arrive and call :meth:`Assembler.finish`:

- Noise readouts (flag ACQ_IS_NOISE_MEASUREMENT) are kept, concatenated, as ``scan.noise``.
- Navigator, phase-correction, dummy-scan and feedback readouts are ignored.
- Readout line ``idx.kspace_encode_step_1`` goes to row ``ky + (ny // 2 - limits.center)``
  of the encoded matrix (``ny`` = encodedSpace y); the sample ``center_sample`` lands on
  column ``nx // 2``. Only acquired lines need to arrive (prospective undersampling).
- Every measured line is data: lines flagged ACQ_IS_PARALLEL_CALIBRATION (calibration only,
  Siemens PATREFSCAN) enter k-space and the sampling mask like imaging lines, as BART pics and
  Gadgetron's SENSE paths use them, unless ``calibration_lines`` says otherwise
  (:data:`CALIBRATION_LINE_MODES`: ``auto`` merges them except when the header's
  ``calibrationMode`` is ``separate``, whose reference scan may have another contrast;
  ``data`` always; ``calibration`` keeps them for the coil maps only, the pure imaging grid).
  Lines flagged ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING are both. The calibration region is the
  run of calibration lines around the centre, or without flags the fully sampled run of lines
  around the centre (``masks.acs_region``); a scan with neither gets ``acs == (0, 0)`` and no
  calibration rows (the methods that need coil maps refuse it; zero-filled does not).
- A separate reference scan with its own encoding (``encoding_space_ref`` 1: the header's
  second ``<encoding>``, another matrix and resolution) is calibration only: its oversampling is
  removed and its k-space is placed on the imaging grid (same field of view: the central rows
  and columns; another field of view: resampled in image space).
- Repeated measurements of a line (``idx.average``, or a line sent twice) are averaged, never
  overwritten.
- Partial readouts (asymmetric echo, ``center_sample`` below half the readout) mark only the
  measured columns in the mask; partial Fourier in phase follows from the encoding limits'
  centre. Noise readouts measured with another dwell time than the imaging readouts are scaled
  by ``sqrt(dwell_noise / dwell_imaging)`` (noise variance per sample goes with the bandwidth,
  1/dwell), as Gadgetron's NoiseAdjustGadget does.
- Readout oversampling: when readouts are longer than reconSpace x, each line is placed in a
  row of encodedSpace x, transformed to image space along x, cropped to the central reconSpace x
  columns and transformed back (centred orthonormal FFT), in batches while the scan streams in
  (:class:`recon_server.mrd.oversampling.StreamingCropper`). K-space is stored at reconSpace x.
- Geometry per slice (``idx.slice``) comes from its first imaging readout (position and
  read/phase/slice directions) and reconSpace fieldOfView_mm. All-zero direction vectors
  (some simulators write them) are replaced by the identity axes.

Bounds before allocation (``limits``, :class:`~recon_server.mrd.wire.WireLimits`): the header's
matrix (``max_matrix``, ``max_samples``), slices (``max_slices``) and channels (``max_channels``)
are checked when the header arrives, and the k-space it asks for (slices x coils x ky x kx x 8
bytes per (contrast, repetition), calibration held apart and readout staging included) against
``max_scan_bytes``, before any buffer exists; so is every later store, noise and reference line.
Every readout's indices are checked against the header's encoding limits: slice, contrast,
repetition and average at most :data:`INDEX_TOLERANCE` beyond the limit's maximum (slices within
it are allocated up front; buffers never grow), phase-encode line and readout inside the encoded
matrix, channels as the header says; NaN or infinite samples (or beyond 1e19) are refused.

Contrast label rule (first that applies), see :func:`contrast_label`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import ismrmrd
import numpy as np
from ismrmrd import xsd

from recon_server.mrd import reference, wire
from recon_server.mrd.buffers import POOL
from recon_server.mrd.ismrmrd_io import ACQUISITION_HEADER_DTYPE, field_reader
from recon_server.mrd.oversampling import StreamingCropper
from recon_server.recon.masks import acceleration_of, acs_region, mask_2d
from recon_server.scan import KSpaceScan, SliceGeometry

log = logging.getLogger(__name__)


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
#: Indices a scanner may send beyond the header's encodingLimits maximum: converters and
#: simulators count one short (the ISMRMRD Shepp-Logan generator writes repetition maximum 0 and
#: sends two interleaved repetitions). Slices within it are allocated up front; each contrast or
#: repetition costs a scan's k-space and is held to ``max_scan_bytes``.
INDEX_TOLERANCE = 1
STAGING_LINES = 64  # oversampled lines staged and cropped together
#: Index caps whatever the header says: the returned images' image_series_index (contrast x 1000 +
#: repetition + 1, SD maps + 500: ``pipeline``) is a uint16 and must stay unique.
MAX_INDEX = {"contrast": 64, "repetition": 498}
#: ``calibration_lines``: what calibration-only lines are (module docstring).
CALIBRATION_LINE_MODES = ("auto", "data", "calibration")
KNOWN_CONTRASTS = ("FLAIR", "T1POST", "T1", "T2", "PD", "DWI")


def parse_header(header_xml: str) -> xsd.ismrmrdHeader:
    """Parse an ISMRMRD XML header; ValueError naming the problem if it does not parse."""
    try:
        return xsd.CreateFromDocument(header_xml.rstrip("\x00"))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"ISMRMRD header XML does not parse: {exc}") from None


def contrast_label(header: xsd.ismrmrdHeader, config: dict | None = None, *, contrast_index: int = 0) -> str:
    """The contrast label of a scan, by the first rule that gives one.

    1. ``config["contrast"]`` (the JSON TEXT a FIRE client sends after the header).
    2. userParameterString ``contrast`` in the XML header.
    3. Keywords in measurementInformation protocolName / seriesDescription / sequenceName:
       FLAIR; T1 with POST, GD or +C -> T1POST; T2; T1; PD; DWI / DIFF -> DWI.
    4. sequenceParameters (ms; the echo time of ``contrast_index`` if listed):
       TI >= 1500 and TE >= 60 -> FLAIR; TI present and TE < 30 -> T1;
       TR >= 2000 and TE >= 60 -> T2; TR < 1000 and TE < 30 -> T1.
    5. Otherwise ``""`` (unknown; the default method applies).
    """
    if config and isinstance(config.get("contrast"), str) and config["contrast"].strip():
        return config["contrast"].strip().upper()
    params = header.userParameters
    if params is not None:
        for p in params.userParameterString or []:
            if str(p.name).lower() == "contrast" and str(p.value).strip():
                return str(p.value).strip().upper()
    info = header.measurementInformation
    if info is not None:
        text = " ".join(str(t) for t in (info.protocolName, info.seriesDescription, info.sequenceName) if t)
        text = text.upper().replace("-", "_").replace(" ", "_")
        if "FLAIR" in text:
            return "FLAIR"
        if "T1" in text and any(k in text for k in ("POST", "GD", "+C", "CONTRAST")):
            return "T1POST"
        for key in ("T2", "T1", "PD"):
            if key in text:
                return key
        if "DWI" in text or "DIFF" in text:
            return "DWI"
    seq = header.sequenceParameters
    if seq is not None:

        def pick(values: list | None) -> float | None:
            if not values:
                return None
            return float(values[min(contrast_index, len(values) - 1)])

        tr, te, ti = pick(seq.TR), pick(seq.TE), pick(seq.TI)
        if ti is not None and te is not None and ti >= 1500 and te >= 60:
            return "FLAIR"
        if ti is not None and te is not None and te < 30:
            return "T1"
        if tr is not None and te is not None:
            if tr >= 2000 and te >= 60:
                return "T2"
            if tr < 1000 and te < 30:
                return "T1"
    return ""


def _limit_maximum(limits: xsd.encodingLimitsType | None, name: str) -> int | None:
    """``encodingLimits.<name>.maximum``, or None when the header does not give it."""
    limit = getattr(limits, name, None) if limits is not None else None
    maximum = getattr(limit, "maximum", None)
    return int(maximum) if maximum is not None else None


def _unit(v: np.ndarray, default: tuple[float, float, float]) -> tuple[float, float, float]:
    norm = float(np.linalg.norm(v))
    if norm < 1e-6:
        return default
    return (float(v[0] / norm), float(v[1] / norm), float(v[2] / norm))


class _HeadGeometry(NamedTuple):
    """What a slice's first imaging readout says about where and when it was measured."""

    vectors: np.ndarray  # float (12,): position, read, phase, slice directions
    table_position: tuple[float, float, float]
    acquisition_time_stamp: int
    physiology_time_stamp: tuple[int, int, int]

    @classmethod
    def of(cls, head: np.void | np.ndarray) -> _HeadGeometry:
        table = head["patient_table_position"]
        physio = head["physiology_time_stamp"]
        return cls(
            vectors=np.concatenate(
                [head["position"], head["read_dir"], head["phase_dir"], head["slice_dir"]]
            ),
            table_position=(float(table[0]), float(table[1]), float(table[2])),
            acquisition_time_stamp=int(head["acquisition_time_stamp"]),
            physiology_time_stamp=(int(physio[0]), int(physio[1]), int(physio[2])),
        )


@dataclass
class _Store:
    """Lines of one (contrast, repetition), preallocated at (slices, coils, ny, nx).

    ``kspace`` holds the sum of every measurement of a row and ``counts`` how many there were
    (averages are divided out at the end). ``calib_only`` holds the lines that are calibration
    only (``calibration_lines`` ``calibration``, or a separate reference scan).
    """

    kspace: np.ndarray
    counts: np.ndarray  # uint16 (slices, ny): measurements summed into kspace per row
    imaging: np.ndarray  # bool (ny,), rows holding data
    calibration_rows: np.ndarray  # bool (ny,), rows usable for calibration
    calib_only: np.ndarray | None = None  # (slices, coils, ny, nx) for calibration-only lines
    calib_only_rows: np.ndarray | None = None  # bool (ny,), rows held in calib_only
    geometry: dict[int, _HeadGeometry] = field(default_factory=dict)
    slices_seen: set[int] = field(default_factory=set)

    def destination(self, calib_only: bool) -> np.ndarray:
        """The array a line goes to: ``calib_only`` (allocated on first use) or ``kspace``."""
        if not calib_only:
            return self.kspace
        if self.calib_only is None:
            self.calib_only = POOL.zeros(self.kspace.shape)
            self.calib_only_rows = np.zeros(self.kspace.shape[-2], dtype=bool)
        return self.calib_only


class _Target(NamedTuple):
    """Where a line goes: store key (contrast, repetition), slice, row, calibration-only."""

    key: tuple[int, int]
    slice: int
    row: int
    calib_only: bool


class _ReferenceLine(NamedTuple):
    """A readout of a separate reference scan (``encoding_space_ref`` > 0), placed at the end."""

    key: tuple[int, int]
    slice: int
    ky: int
    centre: int
    data: np.ndarray


class Assembler:
    """Collects readouts of one stream into k-space scans (see the module docstring)."""

    def __init__(
        self,
        header_xml: str,
        *,
        config: dict | None = None,
        calibration_lines: str = "auto",
        limits: wire.WireLimits | None = None,
    ) -> None:
        if calibration_lines not in CALIBRATION_LINE_MODES:
            raise ValueError(
                f"calibration_lines must be one of {', '.join(CALIBRATION_LINE_MODES)}, "
                f"got {calibration_lines!r}"
            )
        self.limits = lim = limits or wire.WireLimits()
        self.header_xml = header_xml.rstrip("\x00")
        self.header = parse_header(self.header_xml)
        self.config = config or {}
        if not self.header.encoding:
            raise ValueError("ISMRMRD header has no <encoding>")
        enc = self.header.encoding[0]
        self.enc_nx = int(enc.encodedSpace.matrixSize.x)
        self.ny = int(enc.encodedSpace.matrixSize.y)
        self.recon_nx = int(enc.reconSpace.matrixSize.x)
        fov = enc.reconSpace.fieldOfView_mm
        self.fov = (float(fov.x), float(fov.y), float(fov.z))
        if min(self.enc_nx, self.ny, self.recon_nx) < 1:
            raise ValueError(
                f"implausible encoding matrix {self.enc_nx} x {self.ny} (recon x {self.recon_nx})"
            )
        if max(self.ny, self.recon_nx) > lim.max_matrix or self.enc_nx > lim.max_samples:
            raise ValueError(
                f"encoding matrix {self.enc_nx} x {self.ny} (recon x {self.recon_nx}) exceeds this "
                f"server's limits: max_matrix {lim.max_matrix} (phase-encode lines, recon columns), "
                f"max_samples {lim.max_samples} (encoded columns)"
            )
        self.ky_offset = self.ny // 2 - reference.e1_centre(enc, self.ny)
        limits = enc.encodingLimits
        sl = getattr(limits, "slice", None) if limits is not None else None
        self.n_slices = int(sl.maximum) + 1 if sl is not None and sl.maximum is not None else 1
        if not 1 <= self.n_slices <= lim.max_slices:
            raise ValueError(f"the header's {self.n_slices} slices exceed max_slices {lim.max_slices}")
        self.slice_capacity = self.n_slices + INDEX_TOLERANCE  # slices each store holds
        self.index_maxima = {name: _limit_maximum(limits, name) for name in ("contrast", "repetition")}
        average = _limit_maximum(limits, "average")
        self.max_average = average + INDEX_TOLERANCE if average is not None else 1 << 16
        mode = reference.calibration_mode(enc)
        if calibration_lines == "auto":
            calibration_lines = "calibration" if mode == "separate" else "data"
        self.calibration_as_data = calibration_lines == "data"
        system = self.header.acquisitionSystemInformation
        rc = system.receiverChannels if system is not None else None
        self.channels: int | None = int(rc) if rc else None
        if self.channels is not None and not 1 <= self.channels <= lim.max_channels:
            raise ValueError(
                f"the header's receiverChannels {self.channels} is outside 1..{lim.max_channels} "
                "(max_channels)"
            )
        self.allocated = 0  # bytes of k-space, calibration, staging, noise and reference lines held
        self.nx: int | None = None  # width lines are placed in (encodedSpace x when oversampled)
        self.cropper: StreamingCropper[_Target] | None = None
        self.stores: dict[tuple[int, int], _Store] = {}
        self.noise: list[np.ndarray] = []
        self.references: list[_ReferenceLine] = []
        self.columns = np.zeros(self.recon_nx, dtype=bool)  # readout columns measured
        self._extent: tuple[int, int] | None = None  # (x0, samples) of the last line
        self.noise_dwell_us = 0.0
        self.imaging_dwell_us = 0.0
        self.n_lines = 0
        self.measurement_uid = 0
        # The raw stream's identity (KSpaceScan.raw_digest) from its first and last readouts:
        # hashing every line would cost the ingest rate.
        self._first_line: bytes | None = None
        self._last_line: tuple[np.void | np.ndarray, np.ndarray] | None = None
        info = self.header.measurementInformation
        self.measurement_id = str(info.measurementID) if info is not None and info.measurementID else ""
        if self.channels is not None:
            self._check_budget(self.channels)

    # ---------------------------------------------------------------- bounds

    def _check_budget(self, channels: int) -> None:
        """Refuse a scan whose header asks for more k-space than ``max_scan_bytes``, before any buffer."""
        store = self.slice_capacity * channels * self.ny * self.recon_nx * 8
        scans = 1
        for name in ("contrast", "repetition"):
            maximum = self.index_maxima[name]
            scans *= maximum + 1 if maximum is not None else 1
        apart = 1 if self.calibration_as_data else 2  # calibration-only lines held apart
        staging = STAGING_LINES * channels * self.enc_nx * 8 if self.enc_nx > self.recon_nx else 0
        need = store * scans * apart + staging
        limit = self.limits.max_scan_bytes
        if need > limit:
            raise ValueError(
                f"the scan needs {need / 2**30:.1f} GiB of k-space ({self.slice_capacity} slices x "
                f"{channels} coils x {self.ny} x {self.recon_nx} x 8 bytes x {scans} scan(s)"
                + (" x 2 (calibration held apart)" if apart == 2 else "")
                + f"), more than this server's max_scan_bytes ({limit / 2**30:.1f} GiB)"
            )

    def _reserve(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` against ``max_scan_bytes`` (ValueError beyond it) before allocating them."""
        if self.allocated + nbytes > self.limits.max_scan_bytes:
            raise ValueError(
                f"{what}: the stream would hold {(self.allocated + nbytes) / 2**30:.2f} GiB, more than "
                f"this server's max_scan_bytes ({self.limits.max_scan_bytes / 2**30:.1f} GiB)"
            )
        self.allocated += nbytes

    def _beyond(self, line: int, name: str, value: int, maximum: int) -> ValueError:
        return ValueError(
            f"readout {line}: {name} index {value} beyond the header's encoding limits "
            f"(maximum {maximum}, tolerance {INDEX_TOLERANCE})"
        )

    # ---------------------------------------------------------------- feeding

    def _check_channels(self, channels: int, what: str) -> None:
        if self.channels is None:
            self._check_budget(channels)  # the header did not say: the first readout does
            self.channels = channels
        elif channels != self.channels:
            raise ValueError(
                f"{what} has {channels} channels but the header / earlier readouts say {self.channels}"
            )

    def add(self, acq: wire.Acquisition) -> None:
        """Add one readout (head, data (coils, samples))."""
        self.add_line(acq.head, acq.data)

    def add_line(self, head: np.void | np.ndarray, data: np.ndarray) -> None:
        fields = LINE_FIELDS.unpack_from(head.tobytes())
        flags, centre, space, dwell, ky, average, sl, contrast, repetition = fields
        if flags & IGNORED:
            return
        channels, samples = data.shape
        line = self.n_lines
        self.n_lines += 1
        if channels != self.channels:
            self._check_channels(channels, f"readout {line}")
        # sum |x|^2 (BLAS, ~1 us a line): NaN and infinities propagate; |x| > 1e19 overflows too
        if not math.isfinite(np.vdot(data, data).real):
            raise ValueError(f"readout {line} holds NaN or infinite samples (or beyond 1e19)")
        if flags & NOISE:
            self._reserve(data.size * 8, "noise readouts")
            self.noise.append(np.asarray(data, dtype=np.complex64))
            self.noise_dwell_us = self.noise_dwell_us or float(dwell)
            return
        if self._first_line is None:
            self._first_line = head.tobytes() + np.ascontiguousarray(data).tobytes()
            self.measurement_uid = int(head["measurement_uid"])
        self._last_line = (head, data)
        key = (contrast, repetition)
        if sl >= self.slice_capacity:
            raise ValueError(
                f"readout {line}: slice index {sl} beyond the header's {self.n_slices} slice(s) "
                f"(encoding limits; tolerance {INDEX_TOLERANCE}): refused, buffers are never grown"
            )
        if average > self.max_average:
            raise self._beyond(line, "average", average, self.max_average - INDEX_TOLERANCE)
        if space:
            self._reserve(data.size * 8, "reference lines")
            self._add_reference(line, space, _ReferenceLine(key, sl, ky, centre, np.array(data)))
            return
        if self.nx is None:
            # Readouts longer than the recon matrix carry oversampling: place them at the encoded
            # width and crop them to the recon width as they stream in.
            nx = self.enc_nx if samples > self.recon_nx else self.recon_nx
            if nx > self.recon_nx:
                self._reserve(STAGING_LINES * channels * nx * 8, "readout staging")
                self.cropper = StreamingCropper(channels, nx, self.recon_nx, batch=STAGING_LINES)
            self.nx = nx
        ky += self.ky_offset
        if not 0 <= ky < self.ny:
            raise ValueError(
                f"readout {line}: phase-encode line {ky} outside the encoded matrix of {self.ny} lines"
            )
        nx = self.nx
        x0 = nx // 2 - centre if centre else (nx - samples) // 2
        if x0 < 0 or x0 + samples > nx:
            raise ValueError(
                f"readout {line}: {samples} samples with centre {centre} do not fit a "
                f"readout of {nx} (encodedSpace x {self.enc_nx}, reconSpace x {self.recon_nx})"
            )
        store = self.stores.get(key)
        if store is None:
            store = self._new_store(key, line)
            self.stores[key] = store
        if (x0, samples) != self._extent:
            self._mark_columns(x0, samples)
        is_cal = bool(flags & (CALIBRATION | CALIBRATION_AND_IMAGING))
        calib_only = bool(flags & CALIBRATION and not flags & CALIBRATION_AND_IMAGING)
        calib_only = calib_only and not self.calibration_as_data
        if calib_only:
            self._calibration_store(store)
            assert store.calib_only_rows is not None
            store.calib_only_rows[ky] = True
        else:
            store.counts[sl, ky] += 1
            store.imaging[ky] = True
            self.imaging_dwell_us = self.imaging_dwell_us or float(dwell)
            if sl not in store.geometry:
                store.geometry[sl] = _HeadGeometry.of(head)
        if self.cropper is not None:
            cropped = self.cropper.add(_Target(key, sl, ky, calib_only), data, x0)
            if cropped is not None:
                self._place_batch(*cropped)
        elif calib_only:
            store.destination(True)[sl, :, ky, x0 : x0 + samples] = data
        elif store.counts[sl, ky] > 1:
            store.kspace[sl, :, ky, x0 : x0 + samples] += data
        else:
            store.kspace[sl, :, ky, x0 : x0 + samples] = data
        if is_cal:
            store.calibration_rows[ky] = True
        store.slices_seen.add(sl)

    def _mark_columns(self, x0: int, samples: int) -> None:
        """Mark the recon-width columns a readout of ``samples`` at ``x0`` measured."""
        self._extent = (x0, samples)
        assert self.nx is not None
        if samples == self.nx:
            self.columns[:] = True
            return
        # Column i of the placed readout is recon column c_r + (i - c_e) * recon_nx / nx.
        ratio, c_e, c_r = self.recon_nx / self.nx, self.nx // 2, self.recon_nx // 2
        first = c_r + math.ceil((x0 - c_e) * ratio)
        last = c_r + math.floor((x0 + samples - 1 - c_e) * ratio)
        self.columns[max(first, 0) : min(last + 1, self.recon_nx)] = True

    def _place_batch(self, targets: list[_Target], lines: np.ndarray) -> None:
        """Put cropped lines (n, coils, recon nx) in their stores."""
        groups: dict[tuple[tuple[int, int], bool], list[int]] = {}
        for i, t in enumerate(targets):
            groups.setdefault((t.key, t.calib_only), []).append(i)
        for (key, calib_only), rows in groups.items():
            store = self.stores[key]
            dest = self._calibration_store(store) if calib_only else store.kspace
            slices, kys = [targets[i].slice for i in rows], [targets[i].row for i in rows]
            if not calib_only and int(store.counts[slices, kys].max()) > 1:
                for i, s, k in zip(rows, slices, kys, strict=True):  # averages: add, never overwrite
                    dest[s, :, k, :] += lines[i]
                continue
            part = lines if len(rows) == len(targets) else lines[rows]  # one group: no copy
            dest[slices, :, kys, :] = part

    def _add_reference(self, line: int, space: int, ref: _ReferenceLine) -> None:
        if space >= len(self.header.encoding):
            raise ValueError(
                f"readout {line}: encoding_space_ref {space} but the header has "
                f"{len(self.header.encoding)} <encoding> element(s)"
            )
        self.references.append(ref)

    def _new_store(self, key: tuple[int, int], line: int) -> _Store:
        """The store of a new (contrast, repetition): indices and budget checked, then allocated."""
        assert self.channels is not None and self.nx is not None
        for name, value in zip(("contrast", "repetition"), key, strict=True):
            maximum = self.index_maxima[name]
            if maximum is not None and value > maximum + INDEX_TOLERANCE:
                raise self._beyond(line, name, value, maximum)
            if value > MAX_INDEX[name]:
                raise ValueError(
                    f"readout {line}: {name} index {value} beyond {MAX_INDEX[name]}, "
                    "the most this server takes"
                )
        if len(self.stores) >= self.limits.max_scans:
            raise ValueError(
                f"readout {line}: (contrast, repetition) {key} would be scan {len(self.stores) + 1} of "
                f"this stream; max_scans is {self.limits.max_scans}"
            )
        shape = (self.slice_capacity, self.channels, self.ny, self.recon_nx)
        self._reserve(math.prod(shape) * 8, f"readout {line}: contrast {key[0]} repetition {key[1]}")
        return _Store(
            kspace=POOL.zeros(shape),  # reused across scans: fresh memory faults page by page
            counts=np.zeros((self.slice_capacity, self.ny), dtype=np.uint16),
            imaging=np.zeros(self.ny, dtype=bool),
            calibration_rows=np.zeros(self.ny, dtype=bool),
        )

    def _calibration_store(self, store: _Store) -> np.ndarray:
        """``store.calib_only``, allocated (within the budget) on first use."""
        if store.calib_only is None:
            self._reserve(store.kspace.nbytes, "calibration-only lines")
        return store.destination(True)

    def add_recon_data(self, recon: wire.ReconData) -> None:
        """Add Gadgetron ReconData: every non-empty line of ``data`` (and ``ref``, as calibration)."""
        for bit in recon.bits:
            self._add_buffer(bit.data, calibration=False)
            if bit.ref is not None:
                self._add_buffer(bit.ref, calibration=True)

    def _add_buffer(self, buf: wire.ReconBuffer, *, calibration: bool) -> None:
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
                head["idx"]["kspace_encode_step_1"] = i1 - self.ky_offset
                head["idx"]["slice"] = loc
            head["number_of_samples"], head["active_channels"] = e0, cha
            if calibration:
                # Gadgetron's reference buffer repeats the data buffer's calibration-and-imaging
                # lines: calibration only here (as data they would be counted twice).
                head["flags"] = (int(head["flags"]) | CALIBRATION) & ~CALIBRATION_AND_IMAGING
                if self.calibration_as_data and self._holds_row(head):
                    continue
            else:
                head["flags"] = int(head["flags"]) & ~CALIBRATION
            self.add_line(head, line)

    def _holds_row(self, head: np.void | np.ndarray) -> bool:
        """Whether the store of this (contrast, repetition) already has data on the line's row."""
        idx = head["idx"]
        store = self.stores.get((int(idx["contrast"]), int(idx["repetition"])))
        sl, ky = int(idx["slice"]), int(idx["kspace_encode_step_1"]) + self.ky_offset
        return (
            store is not None
            and sl < store.counts.shape[0]
            and 0 <= ky < self.ny
            and bool(store.counts[sl, ky])
        )

    # ---------------------------------------------------------------- finishing

    def finish(self) -> list[KSpaceScan]:
        """Return one scan per (contrast, repetition), in that order."""
        if not self.stores or not any(s.imaging.any() for s in self.stores.values()):
            raise ValueError("the stream holds no imaging readouts")
        cropped = self.cropper.flush() if self.cropper is not None else None
        if cropped is not None:
            self._place_batch(*cropped)
        self._place_references()
        noise = np.concatenate(self.noise, axis=1) if self.noise else None
        if noise is not None and self.noise_dwell_us > 0 and self.imaging_dwell_us > 0:
            if abs(self.noise_dwell_us - self.imaging_dwell_us) > 1e-6 * self.imaging_dwell_us:
                noise = noise * np.float32(math.sqrt(self.noise_dwell_us / self.imaging_dwell_us))
        digest = self._digest()
        return [self._finish_one(key, store, noise, digest) for key, store in sorted(self.stores.items())]

    def _place_references(self) -> None:
        """Put the separate reference scan's lines on the imaging grid, as calibration only."""
        if not self.references:
            return
        grouped: dict[tuple[tuple[int, int], int], list[_ReferenceLine]] = {}
        for ref in self.references:
            grouped.setdefault((ref.key, ref.slice), []).append(ref)
        space = reference.reference_space(self.header.encoding[1])
        for (key, sl), refs in grouped.items():
            store = self.stores.get(key) or next(iter(self.stores.values()))
            if sl >= store.kspace.shape[0]:
                raise ValueError(
                    f"reference line of slice {sl} beyond the imaging scan's {store.kspace.shape[0]} slices"
                )
            grid, measured = reference.reference_kspace(refs, space, channels=store.kspace.shape[1])
            placed, rows = reference.onto_imaging_grid(
                grid, measured, space, ny=self.ny, nx=self.recon_nx, fov_mm=self.fov[:2]
            )
            self._calibration_store(store)[sl][:, rows, :] = placed[:, rows, :]
            assert store.calib_only_rows is not None
            store.calib_only_rows[rows] = True
            store.calibration_rows[rows] = True

    def _digest(self) -> str:
        h = hashlib.blake2b(self.header_xml.encode("utf-8"), digest_size=16)
        h.update(str(self.n_lines).encode())
        h.update(self._first_line or b"")
        if self._last_line is not None:
            head, data = self._last_line
            h.update(head.tobytes() + np.ascontiguousarray(data).tobytes())
        return h.hexdigest()

    def _finish_one(
        self, key: tuple[int, int], store: _Store, noise: np.ndarray | None, digest: str
    ) -> KSpaceScan:
        contrast_index, repetition = key
        if not store.imaging.any():
            raise ValueError(f"contrast {contrast_index} repetition {repetition}: only calibration readouts")
        repeated = np.nonzero(store.counts > 1)
        if repeated[0].size:  # averages: the mean of the measurements of a row
            store.kspace[repeated[0], :, repeated[1], :] /= store.counts[repeated][:, None, None]
        slices = sorted(store.slices_seen)
        # Slices 0..n-1 (the usual case, the tolerated spare slice unused): a view, no copy.
        first = slices == list(range(len(slices)))
        kspace = store.kspace[: len(slices)] if first else store.kspace[slices]
        calib_only = store.calib_only
        if calib_only is not None:
            calib_only = calib_only[: len(slices)] if first else calib_only[slices]
        acs = self._acs(store)
        # A view of k-space unless calibration-only lines must be merged in (a fully sampled
        # scan would otherwise copy all of it).
        calibration = kspace[:, :, acs[0] : acs[1], :]
        if calib_only is not None and store.calib_only_rows is not None:
            rows = np.arange(acs[0], acs[1])
            only = store.calib_only_rows[rows]
            if only.any():
                calibration = calibration.copy()
                calibration[:, :, only, :] = calib_only[:, :, rows[only], :]
        geometry = []
        for sl in slices:
            head = store.geometry.get(sl)
            g = head.vectors if head is not None else np.zeros(12, dtype=np.float32)
            geometry.append(
                SliceGeometry(
                    position=(float(g[0]), float(g[1]), float(g[2])),
                    read_dir=_unit(g[3:6], (1.0, 0.0, 0.0)),
                    phase_dir=_unit(g[6:9], (0.0, 1.0, 0.0)),
                    slice_dir=_unit(g[9:12], (0.0, 0.0, 1.0)),
                    fov_mm=self.fov,
                    slice_index=sl,
                    table_position=head.table_position if head is not None else (0.0, 0.0, 0.0),
                    acquisition_time_stamp=head.acquisition_time_stamp if head is not None else 0,
                    physiology_time_stamp=head.physiology_time_stamp if head is not None else (0, 0, 0),
                )
            )
        return KSpaceScan(
            kspace=kspace,
            mask=mask_2d(store.imaging, kspace.shape[-1]) & self.columns[None, :],
            acs=acs,
            calibration=calibration,
            geometry=geometry,
            header_xml=self.header_xml,
            noise=noise,
            contrast=contrast_label(self.header, self.config, contrast_index=contrast_index),
            acceleration=acceleration_of(store.imaging),
            repetition=repetition,
            contrast_index=contrast_index,
            measurement_id=self.measurement_id,
            measurement_uid=self.measurement_uid,
            raw_digest=digest,
        )

    @staticmethod
    def _acs(store: _Store) -> tuple[int, int]:
        """The calibration rows: the flagged run, else the fully sampled centre, else (0, 0)."""
        try:
            if store.calibration_rows.any():
                # Calibration-only lines held apart: only the flagged rows (their own block).
                rows = (
                    store.calibration_rows
                    if store.calib_only is not None
                    else store.calibration_rows | store.imaging
                )
                return acs_region(rows, min_lines=2)
            return acs_region(store.imaging, min_lines=4)
        except ValueError as exc:
            log.warning("no calibration region (%s): coil maps cannot be estimated", exc)
            return (0, 0)


def parse_config_text(text: str) -> dict:
    """Parse the optional JSON TEXT a FIRE client sends after the header ({} if not JSON)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def assemble(
    header_xml: str,
    lines: list[tuple[np.void, np.ndarray]],
    *,
    config: dict | None = None,
    calibration_lines: str = "auto",
) -> list[KSpaceScan]:
    """Convenience: assemble a whole list of ``(head, data)`` readouts at once."""
    asm = Assembler(header_xml, config=config, calibration_lines=calibration_lines)
    for head, data in lines:
        asm.add_line(head, data)
    return asm.finish()
