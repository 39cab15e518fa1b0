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

What the header says (matrix, bounds, contrast label) is :mod:`.encoding`; readout flags and
ReconData unpacking :mod:`.readouts`; a (contrast, repetition)'s store of lines and the KSpaceScan
it becomes, :mod:`.scan_store`.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import NamedTuple

import numpy as np

from recon_server.mrd import reference, wire
from recon_server.mrd.buffers import POOL
from recon_server.mrd.encoding import INDEX_TOLERANCE, STAGING_LINES, ScanLayout, parse_header
from recon_server.mrd.oversampling import StreamingCropper
from recon_server.mrd.readouts import (
    CALIBRATION,
    CALIBRATION_AND_IMAGING,
    IGNORED,
    LINE_FIELDS,
    NOISE,
    buffer_readouts,
)
from recon_server.mrd.scan_store import HeadGeometry, ScanStore, StreamFacts, finish_scan
from recon_server.scan import KSpaceScan

#: Index caps whatever the header says: the returned images' image_series_index (contrast x 1000 +
#: repetition + 1, SD maps + 500: ``pipeline``) is a uint16 and must stay unique.
MAX_INDEX = {"contrast": 64, "repetition": 498}
#: ``calibration_lines``: what calibration-only lines are (module docstring).
CALIBRATION_LINE_MODES = ("auto", "data", "calibration")


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
        self.limits = limits or wire.WireLimits()
        self.header_xml = header_xml.rstrip("\x00")
        self.header = parse_header(self.header_xml)
        self.config = config or {}
        self.layout = ScanLayout.of(self.header, self.limits, calibration_lines)
        self.channels: int | None = self.layout.channels  # else the first readout's
        self.allocated = 0  # bytes of k-space, calibration, staging, noise and reference lines held
        self.nx: int | None = None  # width lines are placed in (encodedSpace x when oversampled)
        self.cropper: StreamingCropper[_Target] | None = None
        self.stores: dict[tuple[int, int], ScanStore] = {}
        self.noise: list[np.ndarray] = []
        self.references: list[_ReferenceLine] = []
        self.columns = np.zeros(self.layout.recon_nx, dtype=bool)  # readout columns measured
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
            self.layout.check_budget(self.channels, self.limits.max_scan_bytes)

    # ---------------------------------------------------------------- bounds

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

    def _check_channels(self, channels: int, what: str) -> None:
        if self.channels is None:
            self.layout.check_budget(channels, self.limits.max_scan_bytes)  # the header did not say
            self.channels = channels
        elif channels != self.channels:
            raise ValueError(
                f"{what} has {channels} channels but the header / earlier readouts say {self.channels}"
            )

    def _check_slice_and_average(self, line: int, sl: int, average: int) -> None:
        layout = self.layout
        if sl >= layout.slice_capacity:
            raise ValueError(
                f"readout {line}: slice index {sl} beyond the header's {layout.n_slices} slice(s) "
                f"(encoding limits; tolerance {INDEX_TOLERANCE}): refused, buffers are never grown"
            )
        if average > layout.max_average:
            raise self._beyond(line, "average", average, layout.max_average - INDEX_TOLERANCE)

    # ---------------------------------------------------------------- feeding

    def add(self, acq: wire.Acquisition) -> None:
        """Add one readout (head, data (coils, samples))."""
        self.add_line(acq.head, acq.data)

    def add_line(self, head: np.void | np.ndarray, data: np.ndarray) -> None:
        """Add one readout: a noise, reference, imaging or calibration line (module docstring)."""
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
        self._check_slice_and_average(line, sl, average)
        if space:
            self._reserve(data.size * 8, "reference lines")
            self._add_reference(line, space, _ReferenceLine(key, sl, ky, centre, np.array(data)))
            return
        row, x0 = self._placement(line, ky, centre, channels, samples)
        calib_only = bool(flags & CALIBRATION and not flags & CALIBRATION_AND_IMAGING)
        target = _Target(key, sl, row, calib_only and not self.layout.calibration_as_data)
        is_cal = bool(flags & (CALIBRATION | CALIBRATION_AND_IMAGING))
        self._store_line(target, head, data, x0, line=line, dwell=float(dwell), is_cal=is_cal)

    def _placement(self, line: int, ky: int, centre: int, channels: int, samples: int) -> tuple[int, int]:
        """The row and first column of a readout, checked against the encoded matrix."""
        layout = self.layout
        if self.nx is None:
            # Readouts longer than the recon matrix carry oversampling: place them at the encoded
            # width and crop them to the recon width as they stream in.
            nx = layout.enc_nx if samples > layout.recon_nx else layout.recon_nx
            if nx > layout.recon_nx:
                self._reserve(STAGING_LINES * channels * nx * 8, "readout staging")
                self.cropper = StreamingCropper(channels, nx, layout.recon_nx, batch=STAGING_LINES)
            self.nx = nx
        row = ky + layout.ky_offset
        if not 0 <= row < layout.ny:
            raise ValueError(
                f"readout {line}: phase-encode line {row} outside the encoded matrix of {layout.ny} lines"
            )
        nx = self.nx
        x0 = nx // 2 - centre if centre else (nx - samples) // 2
        if x0 < 0 or x0 + samples > nx:
            raise ValueError(
                f"readout {line}: {samples} samples with centre {centre} do not fit a "
                f"readout of {nx} (encodedSpace x {layout.enc_nx}, reconSpace x {layout.recon_nx})"
            )
        return row, x0

    def _store_line(
        self,
        target: _Target,
        head: np.void | np.ndarray,
        data: np.ndarray,
        x0: int,
        *,
        line: int,
        dwell: float,
        is_cal: bool,
    ) -> None:
        """Put an imaging or calibration line in the store of its (contrast, repetition)."""
        key, sl, ky, calib_only = target
        samples = data.shape[1]
        store = self.stores.get(key)
        if store is None:
            store = self._new_store(key, line)
            self.stores[key] = store
        if (x0, samples) != self._extent:
            self._mark_columns(x0, samples)
        if calib_only:
            self._calibration_store(store)
            assert store.calib_only_rows is not None
            store.calib_only_rows[ky] = True
        else:
            store.counts[sl, ky] += 1
            store.imaging[ky] = True
            self.imaging_dwell_us = self.imaging_dwell_us or dwell
            if sl not in store.geometry:
                store.geometry[sl] = HeadGeometry.of(head)
        if self.cropper is not None:
            cropped = self.cropper.add(target, data, x0)
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
        ratio, c_e, c_r = self.layout.recon_nx / self.nx, self.nx // 2, self.layout.recon_nx // 2
        first = c_r + math.ceil((x0 - c_e) * ratio)
        last = c_r + math.floor((x0 + samples - 1 - c_e) * ratio)
        self.columns[max(first, 0) : min(last + 1, self.layout.recon_nx)] = True

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

    def _new_store(self, key: tuple[int, int], line: int) -> ScanStore:
        """The store of a new (contrast, repetition): indices and budget checked, then allocated."""
        assert self.channels is not None and self.nx is not None
        for name, value in zip(("contrast", "repetition"), key, strict=True):
            maximum = self.layout.index_maxima[name]
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
        shape = (self.layout.slice_capacity, self.channels, self.layout.ny, self.layout.recon_nx)
        self._reserve(math.prod(shape) * 8, f"readout {line}: contrast {key[0]} repetition {key[1]}")
        return ScanStore(
            kspace=POOL.zeros(shape),  # reused across scans: fresh memory faults page by page
            counts=np.zeros((self.layout.slice_capacity, self.layout.ny), dtype=np.uint16),
            imaging=np.zeros(self.layout.ny, dtype=bool),
            calibration_rows=np.zeros(self.layout.ny, dtype=bool),
        )

    def _calibration_store(self, store: ScanStore) -> np.ndarray:
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
        for head, line in buffer_readouts(buf, calibration=calibration, ky_offset=self.layout.ky_offset):
            # A reference line the data buffer already holds as data would be counted twice.
            if calibration and self.layout.calibration_as_data and self._holds_row(head):
                continue
            self.add_line(head, line)

    def _holds_row(self, head: np.void | np.ndarray) -> bool:
        """Whether the store of this (contrast, repetition) already has data on the line's row."""
        idx = head["idx"]
        store = self.stores.get((int(idx["contrast"]), int(idx["repetition"])))
        sl, ky = int(idx["slice"]), int(idx["kspace_encode_step_1"]) + self.layout.ky_offset
        return (
            store is not None
            and sl < store.counts.shape[0]
            and 0 <= ky < self.layout.ny
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
        noise = self._noise()
        stream = StreamFacts(
            header_xml=self.header_xml,
            header=self.header,
            config=self.config,
            fov=self.layout.fov,
            columns=self.columns,
            noise=noise,
            measurement_id=self.measurement_id,
            measurement_uid=self.measurement_uid,
            raw_digest=self._digest(),
        )
        return [finish_scan(key, store, stream) for key, store in sorted(self.stores.items())]

    def _noise(self) -> np.ndarray | None:
        """The noise readouts, scaled to the imaging dwell time when measured with another."""
        noise = np.concatenate(self.noise, axis=1) if self.noise else None
        if noise is not None and self.noise_dwell_us > 0 and self.imaging_dwell_us > 0:
            if abs(self.noise_dwell_us - self.imaging_dwell_us) > 1e-6 * self.imaging_dwell_us:
                noise = noise * np.float32(math.sqrt(self.noise_dwell_us / self.imaging_dwell_us))
        return noise

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
                grid, measured, space, ny=self.layout.ny, nx=self.layout.recon_nx, fov_mm=self.layout.fov[:2]
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
