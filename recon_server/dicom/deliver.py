"""The DICOM output sink of the service: write a series, spool it, and a sender thread.

``store_series(volume, config)`` is the one call the service and ``recon-server recon``
make per reconstructed series. It builds and validates every dataset first, writes
``output_dir/<SeriesInstanceUID>/IMnnnnn.dcm`` atomically, and, when destinations are
configured, puts each image durably into the spool. Network traffic happens only in
:class:`SenderWorker` (or ``recon-server spool-drain``), never inside ``store_series``.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path

from recon_server.dicom.config import DicomConfig
from recon_server.dicom.sender import PacsSender
from recon_server.dicom.spool import DELIVERY_TAG, Spool
from recon_server.dicom.writer import (
    GENERATED_STUDY_UID_NOTE,
    MISSING_PATIENT_ID_NOTE,
    build_series,
    write_atomic,
)
from recon_server.scan import ImageVolume

log = logging.getLogger(__name__)


class MissingIdentifierError(ValueError):
    """The series lacks PatientID / StudyInstanceUID and the config forbids sending it."""

    def __init__(self, message: str, paths: list[Path]) -> None:
        super().__init__(message)
        self.paths = paths


def store_series(
    volume: ImageVolume, config: DicomConfig, *, worker: SenderWorker | None = None
) -> list[Path]:
    """Write ``volume`` as DICOM files, spool them for every destination; return the file paths.

    Raises ValueError for bad input (nothing is written then), and
    :class:`MissingIdentifierError` when destinations are configured but the header has no
    PatientID or StudyInstanceUID (the files are written to ``output_dir`` but not spooled)
    unless ``config.allow_missing_identifiers``. ``worker`` is woken to send at once.

    With destinations, a marker (:meth:`Spool.begin_series`, tagged with the journal delivery
    :data:`~recon_server.dicom.spool.DELIVERY_TAG`) is written before the first file and closed
    after the last image is spooled, so that a restart after a crash anywhere in between
    finishes the series or leaves it to the journal (:meth:`Spool.reconcile`).
    """
    datasets = build_series(volume, uid_root=config.uid_root, manufacturer=config.manufacturer)
    series_uid = str(datasets[0].SeriesInstanceUID)
    series_dir = config.output_dir / series_uid
    targets = [series_dir / f"IM{int(ds.InstanceNumber):05d}.dcm" for ds in datasets]
    if not config.destinations:
        return [write_atomic(ds, path) for ds, path in zip(datasets, targets, strict=True)]
    comments = str(datasets[0].get("ImageComments", ""))
    missing = [
        name
        for name, note in (
            ("PatientID", MISSING_PATIENT_ID_NOTE),
            ("StudyInstanceUID", GENERATED_STUDY_UID_NOTE),
        )
        if note in comments
    ]
    if missing and not config.allow_missing_identifiers:
        paths = [write_atomic(ds, path) for ds, path in zip(datasets, targets, strict=True)]
        raise MissingIdentifierError(
            f"not sending series {series_uid} to {', '.join(d.name for d in config.destinations)}: "
            f"the ISMRMRD header has no {' and '.join(missing)}; the files are in {series_dir} "
            "(set allow_missing_identifiers=True only for a research PACS)",
            paths,
        )
    spool = Spool(config.spool_dir)
    names = [d.name for d in config.destinations]
    sops = [str(ds.SOPInstanceUID) for ds in datasets]
    spool.begin_series(series_uid, files=targets, sop_uids=sops, destinations=names, tag=DELIVERY_TAG.get())
    paths = [write_atomic(ds, path) for ds, path in zip(datasets, targets, strict=True)]
    for ds, sop in zip(datasets, sops, strict=True):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        spool.enqueue(buffer.getvalue(), series_uid=series_uid, sop_uid=sop, destinations=names)
    spool.end_series(series_uid)
    log.info(
        "series %s: %d images written to %s and spooled for %s", series_uid, len(paths), series_dir, names
    )
    if worker is not None:
        worker.wake()
    return paths


class SenderWorker:
    """A daemon thread that drains the spool until :meth:`stop`; owned by the server.

    Whatever is in the spool when it starts is sent first (restart safety); new series are
    picked up at the next poll or at once after :meth:`wake`.
    """

    def __init__(self, config: DicomConfig, *, spool: Spool | None = None) -> None:
        self.config = config
        self.sender = PacsSender(config, spool)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error = ""

    def start(self) -> SenderWorker:
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("SenderWorker already running")
        self._stop.clear()
        self.sender.spool.clean_tmp()
        self._thread = threading.Thread(target=self._run, name="dicom-sender", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        """Send now instead of at the next poll (back-off of failed destinations still applies)."""
        self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the current C-STORE; pending images stay in the spool."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("dicom sender did not stop within %.0f s", timeout_s)

    def drain_and_stop(self, timeout_s: float) -> int:
        """Keep sending until nothing is pending or ``timeout_s`` passed, then :meth:`stop`;
        returns the images still pending (sent after the restart)."""
        deadline = time.monotonic() + timeout_s
        names = [d.name for d in self.config.destinations]
        self.wake()
        while self.alive and time.monotonic() < deadline:
            if sum(self.sender.spool.pending_count(name) for name in names) == 0:
                break
            time.sleep(0.1)
        self.stop(max(1.0, deadline - time.monotonic()))
        return sum(self.sender.spool.pending_count(name) for name in names)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                report = self.sender.drain_once(self._stop.is_set)
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any one bad series
                log.exception("dicom sender pass failed")
                self.last_error = str(exc)
                report = None
            wait = self.config.poll_interval_s
            if report is not None and report.next_due_s is not None:
                wait = min(wait, report.next_due_s)
            self._wake.wait(max(wait, 0.01))
            self._wake.clear()
