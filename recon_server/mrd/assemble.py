"""Acquisitions (or Gadgetron ReconData) -> one :class:`KSpaceScan` per (contrast, repetition).

Feed an :class:`Assembler` the readouts as they arrive and call :meth:`Assembler.finish`:

- Noise readouts (flag ACQ_IS_NOISE_MEASUREMENT) are kept, concatenated, as ``scan.noise``.
- Navigator, phase-correction, dummy-scan and feedback readouts are ignored.
- Readout line ``idx.kspace_encode_step_1`` goes to row ``ky + (ny // 2 - limits.center)``
  of the encoded matrix (``ny`` = encodedSpace y); the sample ``center_sample`` lands on
  column ``nx // 2``. Only acquired lines need to arrive (prospective undersampling).
- Lines flagged ACQ_IS_PARALLEL_CALIBRATION are calibration only; lines flagged
  ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING are both. Without either flag the calibration
  region is the fully sampled run of lines around the centre (``masks.acs_region``).
- Readout oversampling: when readouts are longer than reconSpace x, each line is placed in a
  row of encodedSpace x, transformed to image space along x, cropped to the central reconSpace x
  columns and transformed back (centred orthonormal FFT), in batches while the scan streams in
  (:class:`recon_server.mrd.oversampling.StreamingCropper`). K-space is stored at reconSpace x.
- Geometry per slice (``idx.slice``) comes from its first imaging readout (position and
  read/phase/slice directions) and reconSpace fieldOfView_mm. All-zero direction vectors
  (some simulators write them) are replaced by the identity axes.

Contrast label rule (first that applies), see :func:`contrast_label`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import ismrmrd
import numpy as np
from ismrmrd import xsd

from recon_server.data.ismrmrd_io import ACQUISITION_HEADER_DTYPE, field_reader
from recon_server.data.masks import acceleration_of, acs_region, mask_2d
from recon_server.mrd import wire
from recon_server.mrd.buffers import POOL
from recon_server.mrd.oversampling import StreamingCropper
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
    ["flags", "center_sample", "idx.kspace_encode_step_1", "idx.slice", "idx.contrast", "idx.repetition"],
)
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
    """Lines of one (contrast, repetition), preallocated at (slices, coils, ny, nx)."""

    kspace: np.ndarray
    imaging: np.ndarray  # bool (ny,), rows holding imaging data
    calibration_rows: np.ndarray  # bool (ny,), rows usable for calibration
    calib_only: np.ndarray | None = None  # (slices, coils, ny, nx) for calibration-only lines
    geometry: dict[int, _HeadGeometry] = field(default_factory=dict)
    slices_seen: set[int] = field(default_factory=set)

    def destination(self, calib_only: bool) -> np.ndarray:
        """The array a line goes to: ``calib_only`` (allocated on first use) or ``kspace``."""
        if not calib_only:
            return self.kspace
        if self.calib_only is None:
            self.calib_only = POOL.zeros(self.kspace.shape)
        return self.calib_only


class _Target(NamedTuple):
    """Where a line goes: store key (contrast, repetition), slice, row, calibration-only."""

    key: tuple[int, int]
    slice: int
    row: int
    calib_only: bool


class Assembler:
    """Collects readouts of one stream into k-space scans (see the module docstring)."""

    def __init__(self, header_xml: str, *, config: dict | None = None) -> None:
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
        if min(self.enc_nx, self.ny, self.recon_nx) < 1 or self.ny > 16384 or self.enc_nx > 65535:
            raise ValueError(
                f"implausible encoding matrix {self.enc_nx} x {self.ny} (recon x {self.recon_nx})"
            )
        limits = enc.encodingLimits
        e1 = getattr(limits, "kspace_encoding_step_1", None) if limits is not None else None
        centre = int(e1.center) if e1 is not None and e1.center is not None else self.ny // 2
        self.ky_offset = self.ny // 2 - centre
        sl = getattr(limits, "slice", None) if limits is not None else None
        self.n_slices = int(sl.maximum) + 1 if sl is not None and sl.maximum is not None else 1
        if self.n_slices > 4096:
            raise ValueError(f"implausible number of slices {self.n_slices}")
        system = self.header.acquisitionSystemInformation
        rc = system.receiverChannels if system is not None else None
        self.channels: int | None = int(rc) if rc else None
        self.nx: int | None = None  # width lines are placed in (encodedSpace x when oversampled)
        self.cropper: StreamingCropper[_Target] | None = None
        self.stores: dict[tuple[int, int], _Store] = {}
        self.noise: list[np.ndarray] = []
        self.n_lines = 0
        self.measurement_uid = 0
        # The raw stream's identity (KSpaceScan.raw_digest) from its first and last readouts:
        # hashing every line would cost the ingest rate.
        self._first_line: bytes | None = None
        self._last_line: tuple[np.void | np.ndarray, np.ndarray] | None = None
        info = self.header.measurementInformation
        self.measurement_id = str(info.measurementID) if info is not None and info.measurementID else ""

    # ---------------------------------------------------------------- feeding

    def _check_channels(self, channels: int, what: str) -> None:
        if self.channels is None:
            self.channels = channels
        elif channels != self.channels:
            raise ValueError(
                f"{what} has {channels} channels but the header / earlier readouts say {self.channels}"
            )

    def add(self, acq: wire.Acquisition) -> None:
        """Add one readout (head, data (coils, samples))."""
        self.add_line(acq.head, acq.data)

    def add_line(self, head: np.void | np.ndarray, data: np.ndarray) -> None:
        flags, centre, ky, sl, contrast, repetition = LINE_FIELDS.unpack_from(head.tobytes())
        if flags & IGNORED:
            return
        channels, samples = data.shape
        line = self.n_lines
        self.n_lines += 1
        if channels != self.channels:
            self._check_channels(channels, f"readout {line}")
        if flags & NOISE:
            self.noise.append(np.asarray(data, dtype=np.complex64))
            return
        if self._first_line is None:
            self._first_line = head.tobytes() + np.ascontiguousarray(data).tobytes()
            self.measurement_uid = int(head["measurement_uid"])
        self._last_line = (head, data)
        if self.nx is None:
            # Readouts longer than the recon matrix carry oversampling: place them at the encoded
            # width and crop them to the recon width as they stream in.
            self.nx = self.enc_nx if samples > self.recon_nx else self.recon_nx
            if self.nx > self.recon_nx:
                self.cropper = StreamingCropper(channels, self.nx, self.recon_nx)
        key = (contrast, repetition)
        store = self.stores.get(key)
        if store is None:
            store = self._new_store()
            self.stores[key] = store
        ky += self.ky_offset
        if not 0 <= ky < self.ny:
            raise ValueError(
                f"readout {line}: phase-encode line {ky} outside the encoded matrix of {self.ny} lines"
            )
        if sl >= store.kspace.shape[0]:
            store = self._grow(key, store, sl + 1)
        nx = self.nx
        x0 = nx // 2 - centre if centre else (nx - samples) // 2
        if x0 < 0 or x0 + samples > nx:
            raise ValueError(
                f"readout {line}: {samples} samples with centre {centre} do not fit a "
                f"readout of {nx} (encodedSpace x {self.enc_nx}, reconSpace x {self.recon_nx})"
            )
        is_cal = bool(flags & (CALIBRATION | CALIBRATION_AND_IMAGING))
        calib_only = bool(flags & CALIBRATION and not flags & CALIBRATION_AND_IMAGING)
        if self.cropper is not None:
            cropped = self.cropper.add(_Target(key, sl, ky, calib_only), data, x0)
            if cropped is not None:
                self._place_batch(*cropped)
        else:
            store.destination(calib_only)[sl, :, ky, x0 : x0 + samples] = data
        if not calib_only:
            store.imaging[ky] = True
            if sl not in store.geometry:
                store.geometry[sl] = _HeadGeometry.of(head)
        if is_cal:
            store.calibration_rows[ky] = True
        store.slices_seen.add(sl)

    def _place_batch(self, targets: list[_Target], lines: np.ndarray) -> None:
        """Put cropped lines (n, coils, recon nx) in their stores."""
        groups: dict[tuple[tuple[int, int], bool], list[int]] = {}
        for i, t in enumerate(targets):
            groups.setdefault((t.key, t.calib_only), []).append(i)
        for (key, calib_only), rows in groups.items():
            part = lines if len(rows) == len(targets) else lines[rows]  # one group: no copy
            dest = self.stores[key].destination(calib_only)
            dest[[targets[i].slice for i in rows], :, [targets[i].row for i in rows], :] = part

    def _new_store(self) -> _Store:
        assert self.channels is not None and self.nx is not None
        shape = (self.n_slices, self.channels, self.ny, self.recon_nx)
        return _Store(
            kspace=POOL.zeros(shape),  # reused across scans: fresh memory faults page by page
            imaging=np.zeros(self.ny, dtype=bool),
            calibration_rows=np.zeros(self.ny, dtype=bool),
        )

    def _grow(self, key: tuple[int, int], store: _Store, slices: int) -> _Store:
        log.warning("slice index %d beyond the header's encoding limits; growing the buffer", slices - 1)
        pad = ((0, slices - store.kspace.shape[0]), (0, 0), (0, 0), (0, 0))
        store.kspace = np.pad(store.kspace, pad)
        if store.calib_only is not None:
            store.calib_only = np.pad(store.calib_only, pad)
        self.n_slices = max(self.n_slices, slices)
        return store

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
                head["flags"] = (int(head["flags"]) | CALIBRATION) & ~CALIBRATION_AND_IMAGING
            else:
                head["flags"] = int(head["flags"]) & ~CALIBRATION
            self.add_line(head, line)

    # ---------------------------------------------------------------- finishing

    def finish(self) -> list[KSpaceScan]:
        """Return one scan per (contrast, repetition), in that order."""
        if not self.stores or not any(s.imaging.any() for s in self.stores.values()):
            raise ValueError("the stream holds no imaging readouts")
        cropped = self.cropper.flush() if self.cropper is not None else None
        if cropped is not None:
            self._place_batch(*cropped)
        noise = np.concatenate(self.noise, axis=1) if self.noise else None
        digest = self._digest()
        return [self._finish_one(key, store, noise, digest) for key, store in sorted(self.stores.items())]

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
        slices = sorted(store.slices_seen)
        every = slices == list(range(store.kspace.shape[0]))
        kspace = store.kspace if every else store.kspace[slices]  # no copy in the usual case
        calib_only = store.calib_only
        if calib_only is not None and not every:
            calib_only = calib_only[slices]
        if store.calibration_rows.any():
            acs = acs_region(store.calibration_rows | (store.imaging & (calib_only is None)), min_lines=2)
        else:
            acs = acs_region(store.imaging, min_lines=4)
        # A view of k-space unless separate calibration lines must be merged in (a fully sampled
        # scan would otherwise copy all of it).
        calibration = kspace[:, :, acs[0] : acs[1], :]
        if calib_only is not None:
            rows = np.arange(acs[0], acs[1])
            only = store.calibration_rows[rows] & ~store.imaging[rows]
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
            mask=mask_2d(store.imaging, kspace.shape[-1]),
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


def parse_config_text(text: str) -> dict:
    """Parse the optional JSON TEXT a FIRE client sends after the header ({} if not JSON)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def assemble(
    header_xml: str, lines: list[tuple[np.void, np.ndarray]], *, config: dict | None = None
) -> list[KSpaceScan]:
    """Convenience: assemble a whole list of ``(head, data)`` readouts at once."""
    asm = Assembler(header_xml, config=config)
    for head, data in lines:
        asm.add_line(head, data)
    return asm.finish()
