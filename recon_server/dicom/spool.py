"""Durable outbox: every image enters the spool on disk before any network traffic.

Layout (one sub-folder per destination, so each PACS drains independently)::

    spool_dir/
      tmp/                                   files being written (never read by the sender)
      <destination>/pending/<SeriesUID>/<SOPInstanceUID>.dcm
      <destination>/quarantine/<SeriesUID>/<SOPInstanceUID>.dcm
      <destination>/quarantine/<SeriesUID>/<SOPInstanceUID>.reason.json

Enqueue: write to ``tmp/``, fsync the file, hard-link (or copy + fsync) it into each
destination's ``pending/<series>/``, rename into place, fsync the folders, remove the temp
file. After :meth:`Spool.enqueue` returns the image survives a crash or power loss. A file is
removed from ``pending/`` only by :meth:`Spool.complete` (after the PACS confirmed it) or moved
by :meth:`Spool.quarantine` (permanent failure; the reason is written first).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from recon_server.dicom.writer import fsync_dir

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


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

    @staticmethod
    def _remove_if_empty(folder: Path) -> None:
        try:
            folder.rmdir()
        except OSError:  # not empty (more images of the series) or already gone
            return
        fsync_dir(folder.parent)
