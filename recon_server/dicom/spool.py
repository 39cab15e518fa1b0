"""Durable outbox: every image enters the spool on disk before any network traffic.

Layout (one sub-folder per destination, so each PACS drains independently)::

    spool_dir/
      tmp/                                   files being written (never read by the sender)
      <destination>/pending/<SeriesUID>/<SOPInstanceUID>.dcm
      <destination>/quarantine/<SeriesUID>/<SOPInstanceUID>.dcm
      <destination>/quarantine/<SeriesUID>/<SOPInstanceUID>.reason.json
      series/<SeriesUID>.json                series being written and spooled (crash recovery)

Enqueue: write to ``tmp/``, fsync the file, hard-link (or copy + fsync) it into each
destination's ``pending/<series>/``, rename into place, fsync the folders, remove the temp
file. After :meth:`Spool.enqueue` returns the image survives a crash or power loss. A file is
removed from ``pending/`` only by :meth:`Spool.complete` (after the PACS confirmed it) or moved
by :meth:`Spool.quarantine` (permanent failure; the reason is written first).

Series markers: :func:`~recon_server.dicom.deliver.store_series` records a series in
``series/<SeriesUID>.json`` (files, SOPInstanceUIDs, destinations, the journal's delivery tag;
state ``writing``) before its first file is written, and marks it ``spooled`` after its last image
is enqueued. :meth:`Spool.reconcile` (at ``serve`` start) enqueues again every image of a
``writing`` series whose files are all there, drops the marker of one a crash cut while its files
were written (nothing of it was spooled; the journal reconstructs the scan), and reports the tags
of finished series to the journal (docs/dicom.md "Spool layout and guarantees").
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recon_server.dicom.writer import fsync_dir

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

#: The journal delivery (``"<journal entry>/<volume key>"``) whose sinks are running, set by
#: ``service.worker.ReconService`` around them; :func:`deliver.store_series` records it in the marker.
DELIVERY_TAG: ContextVar[str | None] = ContextVar("recon_server_delivery_tag", default=None)
SERIES_DIR = "series"
WRITING, SPOOLED = "writing", "spooled"


@dataclass
class ReconcileReport:
    """What :meth:`Spool.reconcile` did at start."""

    respooled: int = 0  # series spooled again (every image)
    images: int = 0
    dropped: int = 0  # series a crash cut while its files were written (left to the journal)
    delivered_tags: set[str] = field(default_factory=set)


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class SpoolItem:
    """One pending (or quarantined) image of one destination."""

    destination: str
    series_uid: str
    sop_uid: str
    path: Path


@dataclass(frozen=True)
class SeriesBatch:
    """Pending images of one series for one destination, in send order."""

    destination: str
    series_uid: str
    items: tuple[SpoolItem, ...]
    oldest_mtime_ns: int


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target``; copy and fsync where hard links are not supported."""
    target.unlink(missing_ok=True)  # a staged file left by a crash of an earlier process
    try:
        os.link(source, target)
    except FileNotFoundError:
        raise
    except OSError:
        shutil.copyfile(source, target)
        with target.open("rb+") as handle:
            os.fsync(handle.fileno())


def _check_uid(uid: str, what: str) -> str:
    if not _UID_RE.match(uid) or len(uid) > 64:
        raise ValueError(f"{what} {uid!r} is not a valid DICOM UID (digits and dots, at most 64)")
    return uid


class Spool:
    """The on-disk outbox under ``root`` (see module docstring for layout and guarantees)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def pending_dir(self, destination: str) -> Path:
        return self.root / destination / "pending"

    def quarantine_dir(self, destination: str) -> Path:
        return self.root / destination / "quarantine"

    # ---- enqueue ------------------------------------------------------------------------

    def enqueue(
        self, data: bytes, *, series_uid: str, sop_uid: str, destinations: Iterable[str]
    ) -> list[SpoolItem]:
        """Store one encoded DICOM file durably for every destination; returns the items."""
        _check_uid(series_uid, "SeriesInstanceUID")
        _check_uid(sop_uid, "SOPInstanceUID")
        names = list(destinations)
        if not names:
            return []
        fd, tmp_name = tempfile.mkstemp(prefix="in-", suffix=".dcm", dir=self.tmp_dir)
        tmp = Path(tmp_name)
        items = []
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            for name in names:
                items.append(self._place(tmp, name, series_uid, sop_uid))
        finally:
            tmp.unlink(missing_ok=True)
        return items

    def enqueue_file(
        self, path: Path, *, series_uid: str, sop_uid: str, destinations: Iterable[str]
    ) -> list[SpoolItem]:
        """Like :meth:`enqueue` for a file already on disk."""
        return self.enqueue(
            Path(path).read_bytes(), series_uid=series_uid, sop_uid=sop_uid, destinations=destinations
        )

    def _place(self, tmp: Path, destination: str, series_uid: str, sop_uid: str) -> SpoolItem:
        series_dir = self.pending_dir(destination) / series_uid
        final = series_dir / f"{sop_uid}.dcm"
        staged = series_dir / f".{sop_uid}.{os.getpid()}.staged"
        for attempt in range(5):
            new_dirs = [d for d in (series_dir.parent, series_dir) if not d.is_dir()]
            series_dir.mkdir(parents=True, exist_ok=True)
            try:
                _link_or_copy(tmp, staged)
                staged.replace(final)
                break
            except FileNotFoundError:
                # the sender removed the (then empty) series folder between mkdir and link
                if attempt == 4:
                    raise
        fsync_dir(series_dir)
        for parent in new_dirs:
            fsync_dir(parent.parent)
        return SpoolItem(destination, series_uid, sop_uid, final)

    # ---- listing ------------------------------------------------------------------------

    def destinations(self) -> list[str]:
        """Destination folders present in the spool (including ones no longer configured)."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name != "tmp")

    def pending(self, destination: str) -> list[SeriesBatch]:
        """Pending series of ``destination``, oldest first; images sorted by InstanceNumber order.

        Files are named by SOPInstanceUID; within a series they are sent in the order they
        were spooled (mtime, then name), which is slice order for :func:`deliver.store_series`.
        """
        batches = []
        base = self.pending_dir(destination)
        if not base.is_dir():
            return []
        for series_dir in base.iterdir():
            if not series_dir.is_dir():
                continue
            files = []
            for path in series_dir.glob("*.dcm"):
                try:
                    files.append((path.stat().st_mtime_ns, path.name, path))
                except FileNotFoundError:  # completed by another worker meanwhile
                    continue
            if not files:
                continue
            files.sort()
            items = tuple(SpoolItem(destination, series_dir.name, p.stem, p) for _, _, p in files)
            batches.append(SeriesBatch(destination, series_dir.name, items, files[0][0]))
        batches.sort(key=lambda b: (b.oldest_mtime_ns, b.series_uid))
        return batches

    def pending_count(self, destination: str | None = None) -> int:
        names = [destination] if destination else self.destinations()
        return sum(len(b.items) for name in names for b in self.pending(name))

    def quarantined(self, destination: str) -> list[tuple[SpoolItem, dict[str, object]]]:
        """Quarantined images of ``destination`` with their recorded reasons."""
        base = self.quarantine_dir(destination)
        out: list[tuple[SpoolItem, dict[str, object]]] = []
        if not base.is_dir():
            return out
        for path in sorted(base.glob("*/*.dcm")):
            reason_path = path.with_suffix(".reason.json")
            try:
                reason = json.loads(reason_path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                reason = {"reason": "unknown (reason file missing)"}
            out.append((SpoolItem(destination, path.parent.name, path.stem, path), reason))
        return out

    # ---- outcomes -----------------------------------------------------------------------

    def complete(self, item: SpoolItem) -> None:
        """The PACS stored the image: delete it durably (idempotent)."""
        try:
            item.path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(item.path.parent)
        self._remove_if_empty(item.path.parent)

    def quarantine(self, item: SpoolItem, reason: str, *, status: int | None = None) -> Path:
        """Move a permanently failed image aside, with ``<sop>.reason.json`` written first."""
        target_dir = self.quarantine_dir(item.destination) / item.series_uid
        target_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "destination": item.destination,
            "series_uid": item.series_uid,
            "sop_uid": item.sop_uid,
            "reason": reason,
            "status": None if status is None else f"0x{status:04X}",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        reason_path = target_dir / f"{item.sop_uid}.reason.json"
        tmp = target_dir / f".{item.sop_uid}.reason.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        tmp.replace(reason_path)
        target = target_dir / f"{item.sop_uid}.dcm"
        item.path.replace(target)
        fsync_dir(target_dir)
        fsync_dir(item.path.parent)
        self._remove_if_empty(item.path.parent)
        return target

    def requeue(self, destination: str) -> int:
        """Move every quarantined image of ``destination`` back to pending (after a fix)."""
        count = 0
        for item, _ in self.quarantined(destination):
            series_dir = self.pending_dir(destination) / item.series_uid
            series_dir.mkdir(parents=True, exist_ok=True)
            item.path.replace(series_dir / item.path.name)
            item.path.with_suffix(".reason.json").unlink(missing_ok=True)
            fsync_dir(series_dir)
            fsync_dir(item.path.parent)
            self._remove_if_empty(item.path.parent)
            count += 1
        return count

    def clean_tmp(self, *, older_than_s: float = 3600.0) -> int:
        """Remove temp files abandoned by a crash during enqueue (never sent, never pending)."""
        removed = 0
        cutoff = time.time() - older_than_s
        for path in self.tmp_dir.glob("in-*.dcm"):
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # ---- series being written (crash recovery) -----------------------------------------

    def series_marker(self, series_uid: str) -> Path:
        return self.root / SERIES_DIR / f"{_check_uid(series_uid, 'SeriesInstanceUID')}.json"

    def begin_series(
        self,
        series_uid: str,
        *,
        files: Sequence[Path],
        sop_uids: Sequence[str],
        destinations: Iterable[str],
        tag: str | None = None,
    ) -> None:
        """Record, before the first file of a series is written, what the series will be.

        :meth:`reconcile` finishes a series whose marker a crash left (module docstring).
        """
        record = {
            "series_uid": series_uid,
            "files": [str(Path(f).resolve()) for f in files],
            "sop_uids": [_check_uid(uid, "SOPInstanceUID") for uid in sop_uids],
            "destinations": list(destinations),
            "tag": tag,
            "state": WRITING,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        marker = self.series_marker(series_uid)
        marker.parent.mkdir(parents=True, exist_ok=True)
        _write_json(marker, record)

    def end_series(self, series_uid: str) -> None:
        """Every image of the series is in the spool: drop the marker, or (tagged by a journal
        delivery) keep it as ``spooled`` until the journal releases the tag."""
        marker = self.series_marker(series_uid)
        record = _read_json(marker)
        if record is None or not record.get("tag"):
            marker.unlink(missing_ok=True)
            fsync_dir(marker.parent)
            return
        record["state"] = SPOOLED
        _write_json(marker, record)

    def release(self, prefix: str) -> int:
        """Remove the markers whose tag is ``<prefix>/...`` (the journal entry is finished)."""
        removed = 0
        for marker, record in self._markers():
            tag = str(record.get("tag") or "")
            if tag.startswith(f"{prefix}/"):
                marker.unlink(missing_ok=True)
                removed += 1
        if removed:
            fsync_dir(self.root / SERIES_DIR)
        return removed

    def _markers(self) -> list[tuple[Path, dict[str, Any]]]:
        folder = self.root / SERIES_DIR
        if not folder.is_dir():
            return []
        out = []
        for marker in sorted(folder.glob("*.json")):
            record = _read_json(marker)
            if record is None:
                log.error("series marker %s unreadable; removed", marker)
                marker.unlink(missing_ok=True)
                continue
            out.append((marker, record))
        return out

    def reconcile(self) -> ReconcileReport:
        """Finish what a crash left between the output folder and the spool (at start).

        A series marked ``writing`` whose files all exist (each holding the SOPInstanceUID the
        marker names) is enqueued again, every image: images already sent are sent once more and
        the PACS keeps its first copy (same SOPInstanceUID). A series with a file missing was
        never spooled (enqueueing starts after the last file is written): its marker is dropped
        and the journal reconstructs the scan again. ``spooled`` markers report their tags.
        """
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        report = ReconcileReport()
        for marker, record in self._markers():
            tag = record.get("tag")
            if record.get("state") == SPOOLED:
                if tag:
                    report.delivered_tags.add(str(tag))
                continue
            series_uid = str(record.get("series_uid", marker.stem))
            files = [Path(p) for p in record.get("files", [])]
            sops = [str(s) for s in record.get("sop_uids", [])]
            complete = bool(files) and len(files) == len(sops)
            for path, sop in zip(files, sops, strict=False):
                try:
                    found = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                except (OSError, InvalidDicomError, AttributeError, ValueError):
                    found = ""
                if found != sop:
                    complete = False
                    break
            if not complete:
                log.warning(
                    "series %s was being written when the server stopped; none of it was spooled "
                    "(its scan is reconstructed again from the journal)",
                    series_uid,
                )
                marker.unlink(missing_ok=True)
                fsync_dir(marker.parent)
                report.dropped += 1
                continue
            for path, sop in zip(files, sops, strict=True):
                self.enqueue(
                    path.read_bytes(),
                    series_uid=series_uid,
                    sop_uid=sop,
                    destinations=record.get("destinations", []),
                )
            log.warning(
                "series %s: %d images spooled again after a restart (the PACS keeps one copy of each)",
                series_uid,
                len(files),
            )
            report.respooled += 1
            report.images += len(files)
            if tag:
                report.delivered_tags.add(str(tag))
            self.end_series(series_uid)
        return report

    @staticmethod
    def _remove_if_empty(folder: Path) -> None:
        try:
            folder.rmdir()
        except OSError:  # not empty (more images of the series) or already gone
            return
        fsync_dir(folder.parent)
