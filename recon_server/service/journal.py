"""The scan journal: each scan's raw data on disk from its header on, until its images are delivered.

Layout of ``journal_dir`` (``[server] journal_dir``)::

    <id>.h5      ISMRMRD raw file (:mod:`recon_server.mrd.ismrmrd_io` layout, replays with
                 ``recon-server replay``); acquisitions appended in batches as they arrive,
                 flushed and fsynced when the stream's CLOSE arrives
    <id>.json    the entry's record, replaced atomically (temp file, fsync, rename, fsync folder)

``<id>`` is ``<UTC time, microseconds>-<pid>-<counter>``: unique across restarts and never
derived from what a client sent. An entry goes through::

    receiving  (header read; readouts being appended)
      -> received   (CLOSE read, file fsynced: complete raw data, nothing delivered yet)
         -> removed     once every volume went to every sink (DICOM written and spooled, ...)
         -> failed      moved to ``failed_scans_dir`` as ``<time>-<measurement>-<token>.h5``
                        + ``.reason.json``; names are unique, a file is never overwritten
      -> failed     (the stream broke, the scan could not be assembled or reconstructed)

The record lists the volumes a reconstruction made (``planned``, keys from
:func:`recon_server.service.worker.volume_key`) and those delivered to every sink (``delivered``);
a restart delivers only the rest. On ``serve`` start (:func:`recover`), an entry still
``receiving`` is kept as failed (an incomplete stream), a ``received`` one is reconstructed
and delivered again, with the client's method and options, through the normal worker and
sinks; after :data:`MAX_ATTEMPTS` starts that did not finish it (a scan that kills the server)
it is kept as failed too.

Streams of ReconData (1023) are not journaled (an ISMRMRD raw file holds acquisitions).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from recon_server.mrd import ismrmrd_io

log = logging.getLogger(__name__)

#: Acquisitions buffered before one append to the HDF5 file (about 4 MB of 16 x 512 readouts).
BATCH_ROWS = 64
#: Starts of ``serve`` that may try to finish one entry before it is kept as failed.
MAX_ATTEMPTS = 2
MAX_NAME_PART = 64

RECEIVING, RECEIVED, FAILED = "receiving", "received", "failed"
_counter = itertools.count()
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name_part(text: str, *, limit: int = MAX_NAME_PART) -> str:
    """``text`` as a file-name part: ASCII letters, digits and ``._-`` only, bounded, not hidden."""
    cleaned = _UNSAFE.sub("_", text).strip("._")[:limit]
    return cleaned or "scan"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    _fsync_path(path.parent)


def move_unique(source: Path, folder: Path, stem: str, suffix: str = ".h5") -> Path:
    """Move ``source`` into ``folder`` under ``<stem>-<token><suffix>``, never replacing a file.

    A hard link fails when the name exists (then another token is drawn); across file systems
    the file is copied to a temp name, fsynced and linked the same way.
    """
    folder.mkdir(parents=True, exist_ok=True)
    staged: Path | None = None
    for _ in range(100):
        target = folder / f"{stem}-{secrets.token_hex(4)}{suffix}"
        try:
            os.link(staged or source, target)
        except FileExistsError:
            continue
        except OSError:
            if staged is not None:
                raise
            staged = folder / f".{stem}-{secrets.token_hex(4)}.copy"
            shutil.copyfile(source, staged)
            _fsync_path(staged)
            continue
        _fsync_path(folder)
        (staged or source).unlink()
        if staged is not None:
            source.unlink()
        return target
    raise OSError(f"no free file name for {stem} in {folder}")


def _rows(acquisitions: list[Any]) -> np.ndarray:
    """HDF5 rows (``ismrmrd_io.ACQUISITION_ROW_DTYPE``) of wire acquisitions, as ``write_raw`` writes them."""
    rows = np.zeros(len(acquisitions), dtype=ismrmrd_io.ACQUISITION_ROW_DTYPE)
    rows["head"] = np.array([a.head for a in acquisitions], dtype=ismrmrd_io.ACQUISITION_HEADER_DTYPE)
    data, traj = rows["data"], rows["traj"]
    for i, acq in enumerate(acquisitions):
        data[i] = np.ascontiguousarray(acq.data, dtype=np.complex64).view(np.float32).reshape(-1)
        traj[i] = np.ascontiguousarray(acq.traj, dtype=np.float32).reshape(-1)
    return rows


@dataclass
class JournalEntry:
    """One scan in the journal: its raw file, its record, and the writer while it streams."""

    journal: Journal
    id: str
    record: dict[str, Any]
    _file: h5py.File | None = None
    _pending: list[Any] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def raw_path(self) -> Path:
        return self.journal.folder / f"{self.id}.h5"

    @property
    def record_path(self) -> Path:
        return self.journal.folder / f"{self.id}.json"

    @property
    def tag(self) -> str:
        return self.id

    @property
    def state(self) -> str:
        return str(self.record.get("state", ""))

    # ---- streaming ----------------------------------------------------------------------

    def append(self, acquisition: Any) -> None:
        """One readout (a :class:`~recon_server.mrd.wire.Acquisition`); written in batches."""
        self._pending.append(acquisition)
        if len(self._pending) >= BATCH_ROWS:
            self._flush_rows()

    def _flush_rows(self) -> None:
        if not self._pending or self._file is None:
            return
        rows = _rows(self._pending)
        dset = self._file["dataset/data"]
        n = dset.shape[0]
        dset.resize((n + len(rows),))
        dset[n:] = rows
        self.record["readouts"] = n + len(rows)
        self._pending.clear()

    def seal(self, *, method: str | None, samples: int | None, options: dict[str, Any]) -> None:
        """The stream is complete (CLOSE): write the rest, fsync, record ``received``."""
        self._flush_rows()
        self._close_file(sync=True)
        self.record.update(state=RECEIVED, method=method, samples=samples, options=options)
        self._save()

    def _close_file(self, *, sync: bool) -> None:
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None
            if sync:
                _fsync_path(self.raw_path)

    def _save(self) -> None:
        _write_json_atomic(self.record_path, self.record)

    # ---- delivery (service.worker.DeliveryLog) ----------------------------------------

    def planned(self, keys: list[str]) -> None:
        with self._lock:
            self.record["planned"] = sorted(set(keys) | set(self.record.get("planned", [])))
            self._save()

    def is_delivered(self, key: str) -> bool:
        return key in self.record.get("delivered", []) or f"{self.id}/{key}" in self.journal.reconciled

    def delivered(self, key: str) -> None:
        with self._lock:
            done = set(self.record.get("delivered", []))
            done.add(key)
            self.record["delivered"] = sorted(done)
            self._save()

    def output_failed(self, key: str, reason: str) -> None:
        with self._lock:
            self.record.setdefault("output_errors", {})[key] = reason
            self._save()

    @property
    def complete(self) -> bool:
        """Every planned volume delivered (and at least one planned)."""
        planned = self.record.get("planned", [])
        return bool(planned) and all(self.is_delivered(k) for k in planned)

    def output_error(self) -> str:
        errors = self.record.get("output_errors", {})
        return "; ".join(f"volume {k}: {v}" for k, v in sorted(errors.items()) if not self.is_delivered(k))

    # ---- endings ------------------------------------------------------------------------

    def remove(self) -> None:
        """Delivered: delete the raw file, then the record (durably)."""
        self._close_file(sync=False)
        self.raw_path.unlink(missing_ok=True)
        self.record_path.unlink(missing_ok=True)
        _fsync_path(self.journal.folder)
        self.journal.released(self)

    def fail(self, reason: str) -> Path | None:
        """Move the raw file to the failed-scans folder with ``<name>.reason.json``; returns its path."""
        self._flush_rows_quietly()
        self._close_file(sync=True)
        self.record.update(state=FAILED, reason=reason)
        folder = self.journal.failed_dir
        target: Path | None = None
        try:
            if self.raw_path.exists() and self._readouts_on_disk() != 0:
                stem = (
                    f"{time.strftime('%Y%m%dT%H%M%S')}-{safe_name_part(self.record.get('measurement', ''))}"
                )
                target = move_unique(self.raw_path, folder, stem)
                _write_json_atomic(target.with_suffix(".reason.json"), self.record)
                log.warning(
                    "failed scan kept: %s (%d readouts; replay it with recon-server replay): %s",
                    target,
                    self.record.get("readouts", 0),
                    reason,
                )
            self.raw_path.unlink(missing_ok=True)
            self.record_path.unlink(missing_ok=True)
            _fsync_path(self.journal.folder)
        except OSError as exc:
            log.error("could not move journal entry %s to %s: %s", self.id, folder, exc)
            self._save()
            return None
        self.journal.released(self)
        return target

    def _readouts_on_disk(self) -> int:
        """Readouts in the raw file (-1: unreadable, e.g. cut by a crash; it is kept anyway)."""
        if self.record.get("readouts"):
            return int(self.record["readouts"])
        try:
            with h5py.File(self.raw_path, "r") as f:
                return int(f["dataset/data"].shape[0])
        except (OSError, KeyError, ValueError):
            return -1

    def _flush_rows_quietly(self) -> None:
        try:
            self._flush_rows()
        except (OSError, ValueError) as exc:
            log.warning("journal entry %s: last readouts not written: %s", self.id, exc)

    def leave(self) -> None:
        """Close the file but keep the entry as it is (``serve`` stops; a restart finishes it)."""
        self._flush_rows_quietly()
        self._close_file(sync=True)


class Journal:
    """The journal folder (module docstring); thread-safe, one entry per stream."""

    def __init__(
        self,
        folder: Path,
        *,
        failed_dir: Path | None = None,
        on_release: Callable[[str], object] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.failed_dir = Path(failed_dir) if failed_dir is not None else self.folder / "failed"
        self.on_release = on_release
        #: ``"<id>/<volume key>"`` of volumes whose series a restart finished from the DICOM spool
        self.reconciled: set[str] = set()

    def begin(self, header_xml: str, *, measurement: str = "", peer: str = "") -> JournalEntry:
        """A new entry for a stream whose HEADER just arrived (state ``receiving``)."""
        entry_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}{time.time_ns() % 10**9 // 1000:06d}"
        entry_id += f"-{os.getpid()}-{next(_counter)}"
        record = {
            "id": entry_id,
            "state": RECEIVING,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "measurement": measurement,
            "peer": peer,
            "readouts": 0,
            "attempts": 0,
        }
        entry = JournalEntry(self, entry_id, record)
        f = h5py.File(entry.raw_path, "w")
        group = f.create_group("dataset")
        xml = group.create_dataset("xml", shape=(1,), dtype=h5py.vlen_dtype(bytes))
        xml[0] = header_xml.encode("utf-8")
        group.create_dataset(
            "data",
            shape=(0,),
            maxshape=(None,),
            chunks=(BATCH_ROWS,),
            dtype=ismrmrd_io.ACQUISITION_ROW_DTYPE,
        )
        entry._file = f
        entry._save()
        return entry

    def entries(self) -> list[JournalEntry]:
        """Entries on disk, oldest first (unreadable records are skipped with an error)."""
        out = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                log.error("journal record %s unreadable: %s", path, exc)
                continue
            out.append(JournalEntry(self, path.stem, record))
        return out

    def released(self, entry: JournalEntry) -> None:
        self.reconciled = {t for t in self.reconciled if not t.startswith(f"{entry.id}/")}
        if self.on_release is not None:
            try:
                self.on_release(entry.tag)
            except OSError as exc:
                log.warning("journal entry %s: release hook failed: %s", entry.id, exc)

    def clean_tmp(self) -> None:
        for path in self.folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)


def replay_scans(entry: JournalEntry) -> list[Any]:
    """The entry's raw file assembled into scans, with the client's options (contrast, ...)."""
    from recon_server.mrd.assemble import Assembler

    raw = ismrmrd_io.read_raw(entry.raw_path)
    asm = Assembler(raw.header_xml, config=dict(entry.record.get("options") or {}))
    for head, data in zip(raw.acquisition_headers, raw.data, strict=True):
        asm.add_line(head, data)
    return asm.finish()


RunScans = Callable[[list[Any], JournalEntry], None]


def recover(journal: Journal, run: RunScans | None, *, reconciled: Iterable[str] = ()) -> dict[str, int]:
    """Finish what a stopped server left in the journal (module docstring); returns counts.

    ``run(scans, entry)`` reconstructs and delivers (``ReconService.run`` with the entry as its
    delivery log); None when no output is configured (nothing could be delivered: kept as failed).
    ``reconciled``: tags of volumes whose series the DICOM spool finished.
    """
    from recon_server.recon.pipeline import ReconCancelled

    journal.reconciled |= set(reconciled)
    journal.clean_tmp()
    counts = {"delivered": 0, "failed": 0}
    for entry in journal.entries():
        state = entry.state
        if state == RECEIVING:
            entry.fail("incomplete stream: the server stopped while the scan was being received")
            counts["failed"] += 1
            continue
        if state != RECEIVED:
            entry.fail(f"journal entry in unknown state {state!r}")
            counts["failed"] += 1
            continue
        if entry.complete:
            log.info("journal entry %s: every volume was delivered before the restart", entry.id)
            entry.remove()
            counts["delivered"] += 1
            continue
        if run is None:
            entry.fail("not reconstructed after the restart: no output (DICOM, npy) is configured")
            counts["failed"] += 1
            continue
        attempts = int(entry.record.get("attempts", 0))
        if attempts >= MAX_ATTEMPTS:
            entry.fail(f"not finished in {attempts} starts of the server (did it stop the server?)")
            counts["failed"] += 1
            continue
        entry.record["attempts"] = attempts + 1
        entry._save()
        log.info(
            "journal entry %s (measurement %s): reconstructing after the restart (attempt %d)",
            entry.id,
            entry.record.get("measurement") or "-",
            attempts + 1,
        )
        try:
            run(replay_scans(entry), entry)
        except ReconCancelled:  # serve stops again: the entry waits for the next start
            entry.record["attempts"] = attempts
            entry.leave()
            entry._save()
            log.info("journal entry %s: left for the next start (the server stops)", entry.id)
            return counts
        except (OSError, ValueError, RuntimeError) as exc:
            entry.fail(f"reconstruction after the restart failed: {type(exc).__name__}: {exc}")
            counts["failed"] += 1
            continue
        if entry.complete:
            entry.remove()
            counts["delivered"] += 1
        else:
            entry.fail(f"outputs failed after the restart: {entry.output_error() or 'nothing delivered'}")
            counts["failed"] += 1
    return counts
