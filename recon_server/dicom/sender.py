"""Drain the spool to the configured PACS destinations by C-STORE (pynetdicom).

Protocol per series (one association per series)::

    A-ASSOCIATE-RQ  contexts: MR Image Storage (Explicit VR LE, Implicit VR LE), Verification
    C-STORE-RQ x N  (files in spool order); after each response:
        0x0000, 0xB000/0xB006/0xB007 -> stored: delete from the spool
        0xA7xx                       -> out of resources: stop, back off, retry later
        0xA9xx, 0xCxxx, other        -> permanent: quarantine this image with the reason
        no response (abort, timeout) -> stop, back off, retry later (see abort rule)
    A-RELEASE-RQ

Association outcomes: rejected-permanent (e.g. "calling AE title not recognised") ->
quarantine the series; rejected-transient, refused connection, TLS failure -> back off.
Abort rule: Orthanc accepts an association from an unknown calling AE title (for C-ECHO) and
then aborts the first C-STORE. ``RetryPolicy.abort_limit`` such aborts in a row without any
image stored are treated as a permanent refusal naming the AE titles. Back-off per destination:
``min(max_s, initial_s * factor**(failures - 1))``; it resets after any stored image.
"""

from __future__ import annotations

import enum
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

from recon_server.dicom.config import DicomConfig, PacsDestination
from recon_server.dicom.spool import SeriesBatch, Spool, SpoolItem
from recon_server.dicom.writer import GENERATED_STUDY_UID_NOTE

log = logging.getLogger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")

_WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
# A-ASSOCIATE-RJ (result source, reason) -> text (PS3.8 table 9-21)
_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


class Outcome(enum.Enum):
    """What a C-STORE response means for the spooled image."""

    SUCCESS = "success"
    WARNING = "warning"  # stored, with a warning (coercion, elements discarded)
    RETRY = "retry"
    PERMANENT = "permanent"


def classify_status(status: int | None) -> Outcome:
    """Classify a C-STORE status; ``None`` means no response (abort, timeout)."""
    if status is None:
        return Outcome.RETRY
    if status == 0x0000:
        return Outcome.SUCCESS
    if status in _WARNING_STATUSES:
        return Outcome.WARNING
    if 0xA700 <= status <= 0xA7FF:
        return Outcome.RETRY
    # 0xA9xx (data set does not match SOP class), 0xCxxx (cannot understand), 0x0122
    # (SOP class not supported), 0x0124 (not authorised) and unknown codes: resending the
    # same bytes cannot succeed
    return Outcome.PERMANENT


@dataclass
class SeriesResult:
    """Outcome of one attempt to send one series to one destination."""

    stored: int = 0
    warnings: int = 0
    quarantined: int = 0
    retry: bool = False
    message: str = ""


@dataclass
class DestinationState:
    """Back-off bookkeeping of one destination (in memory; the spool itself is the state)."""

    failures: int = 0
    next_attempt: float = 0.0
    aborts_after_accept: int = 0
    last_error: str = ""


@dataclass
class DrainReport:
    """Totals of one :meth:`PacsSender.drain_once` pass."""

    stored: int = 0
    quarantined: int = 0
    pending: int = 0
    errors: list[str] = field(default_factory=list)
    next_due_s: float | None = None


class _ClosingSocket(AssociationSocket):
    """pynetdicom's socket, closed also when the connection failed: its own ``_shutdown_socket``
    skips ``close()`` when ``shutdown()`` raises on a socket that never connected (ResourceWarning:
    unclosed socket, e.g. ``pacs-echo`` against a closed port)."""

    def _shutdown_socket(self) -> None:
        sock = self.socket
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


class _AE(AE):
    def _create_socket(self, assoc, address, tls_args):  # type: ignore[no-untyped-def]
        sock = _ClosingSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


def _make_ae(dest: PacsDestination, config: DicomConfig) -> AE:
    ae = _AE(ae_title=dest.calling_ae)
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = config.connect_timeout_s
    ae.connection_timeout = config.connect_timeout_s
    ae.dimse_timeout = config.dimse_timeout_s
    ae.network_timeout = config.dimse_timeout_s
    return ae


def associate(dest: PacsDestination, config: DicomConfig) -> Association:
    """Open an association (TLS when configured) with the destination."""
    ae = _make_ae(dest, config)
    tls_args = None
    if dest.tls is not None:
        tls_args = (dest.tls.ssl_context(), dest.tls.server_hostname or dest.host)
    return ae.associate(dest.host, dest.port, ae_title=dest.called_ae, tls_args=tls_args)


def describe_failed_association(
    assoc: Association, dest: PacsDestination, timeout_s: float
) -> tuple[bool, str]:
    """(permanent?, message) for an association that was not established."""
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        prim = assoc.acceptor.primitive
        key = (int(prim.result_source or 0), int(prim.diagnostic or 0))
        reason = _REJECT_REASONS.get(key, f"reason {prim.diagnostic}")
        permanent = prim.result == 1
        kind = "permanently" if permanent else "transiently"
        hint = ""
        if (prim.result_source, prim.diagnostic) == (1, 3):
            hint = f" (the PACS does not know calling AE title {dest.calling_ae!r})"
        elif (prim.result_source, prim.diagnostic) == (1, 7):
            hint = f" (the PACS is not called {dest.called_ae!r})"
        return permanent, f"association {kind} rejected by {dest.label}: {reason}{hint}"
    return False, f"cannot associate with {dest.label}: {diagnose_connection(dest, timeout_s)}"


def diagnose_connection(dest: PacsDestination, timeout_s: float) -> str:
    """Why an association failed below DICOM: TCP connect and, with TLS, the handshake."""
    try:
        sock = socket.create_connection((dest.host, dest.port), timeout=timeout_s)
    except OSError as exc:
        return f"TCP connection failed ({exc.strerror or exc})"
    with sock:
        if dest.tls is None:
            return "connected, but the peer aborted or did not answer the association request"
        try:
            context = dest.tls.ssl_context()
            with context.wrap_socket(sock, server_hostname=dest.tls.server_hostname or dest.host) as tls:
                # TLS 1.3 reports a refused client certificate only at the first read
                tls.settimeout(min(timeout_s, 2.0))
                try:
                    tls.recv(1)
                except TimeoutError:
                    pass
        except (ssl.SSLError, OSError) as exc:
            return f"TLS handshake failed ({exc})"
        return "TLS handshake succeeded, but the peer aborted or did not answer the association request"


class PacsSender:
    """Sends spooled images to the destinations of ``config``; safe to restart at any time."""

    def __init__(
        self,
        config: DicomConfig,
        spool: Spool | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.spool = spool or Spool(config.spool_dir)
        self.clock = clock
        self.sleep = sleep
        self.state = {d.name: DestinationState() for d in config.destinations}

    # ---- one series ---------------------------------------------------------------------

    def send_series(
        self, dest: PacsDestination, batch: SeriesBatch, should_stop: Callable[[], bool] = lambda: False
    ) -> SeriesResult:
        """One association: C-STORE every image of ``batch`` (see module docstring)."""
        result = SeriesResult()
        state = self.state.setdefault(dest.name, DestinationState())
        items = [item for item in batch.items if self._identifiers_ok(item, result)]
        if not items:
            return result
        assoc = associate(dest, self.config)
        if not assoc.is_established:
            permanent, message = describe_failed_association(assoc, dest, self.config.connect_timeout_s)
            return self._fail_batch(items, result, message, permanent=permanent)
        stored_here = 0
        try:
            if not any(ctx.abstract_syntax == MRImageStorage for ctx in assoc.accepted_contexts):
                return self._fail_batch(
                    items, result, f"{dest.label} did not accept MR Image Storage", permanent=True
                )
            for item in items:
                if should_stop():
                    break
                try:
                    ds = dcmread(item.path)
                except (InvalidDicomError, OSError, ValueError) as exc:
                    self._quarantine(item, result, f"spooled file is unreadable: {exc}")
                    continue
                response = assoc.send_c_store(ds)
                status = int(response.Status) if "Status" in response else None
                outcome = classify_status(status)
                if outcome in (Outcome.SUCCESS, Outcome.WARNING):
                    self.spool.complete(item)
                    stored_here += 1
                    result.stored += 1
                    result.warnings += outcome is Outcome.WARNING
                    state.aborts_after_accept = 0
                    if self.config.pause_between_stores_s:
                        self.sleep(self.config.pause_between_stores_s)
                elif outcome is Outcome.PERMANENT:
                    assert status is not None
                    comment = str(response.get("ErrorComment", "")).strip()
                    reason = f"C-STORE refused by {dest.label} with status 0x{status:04X}"
                    self._quarantine(item, result, reason + (f": {comment}" if comment else ""), status)
                elif status is not None:
                    result.retry = True
                    result.message = f"{dest.label} is out of resources (status 0x{status:04X})"
                    break
                else:
                    return self._no_response(assoc, dest, items, result, state, stored_here)
        finally:
            if assoc.is_established:
                assoc.release()
        return result

    def _no_response(
        self,
        assoc: Association,
        dest: PacsDestination,
        items: list[SpoolItem],
        result: SeriesResult,
        state: DestinationState,
        stored_here: int,
    ) -> SeriesResult:
        """No C-STORE response: retry, unless the PACS keeps aborting a fresh association."""
        if assoc.is_established:
            assoc.abort()
        if stored_here == 0:
            state.aborts_after_accept += 1
        if state.aborts_after_accept >= self.config.retry.abort_limit:
            message = (
                f"{dest.label} accepted the association but aborted the first C-STORE "
                f"{state.aborts_after_accept} times in a row: the PACS refuses images from calling "
                f"AE title {dest.calling_ae!r} (not in its list of known modalities?)"
            )
            remaining = [i for i in items if i.path.exists()]
            return self._fail_batch(remaining, result, message, permanent=True)
        result.retry = True
        result.message = f"no C-STORE response from {dest.label} (aborted or timed out)"
        return result

    def _identifiers_ok(self, item: SpoolItem, result: SeriesResult) -> bool:
        """Refuse (quarantine) images without PatientID / header StudyInstanceUID."""
        if self.config.allow_missing_identifiers:
            return True
        try:
            ds = dcmread(item.path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            self._quarantine(item, result, f"spooled file is unreadable: {exc}")
            return False
        missing = []
        if not str(ds.get("PatientID", "")).strip():
            missing.append("PatientID")
        if not ds.get("StudyInstanceUID") or GENERATED_STUDY_UID_NOTE in str(ds.get("ImageComments", "")):
            missing.append("StudyInstanceUID from the scanner")
        if missing:
            self._quarantine(
                item,
                result,
                f"refusing to send to a PACS without {' and '.join(missing)} "
                "(set allow_missing_identifiers=True for a research PACS)",
            )
            return False
        return True

    def _quarantine(
        self, item: SpoolItem, result: SeriesResult, reason: str, status: int | None = None
    ) -> None:
        log.error("quarantined %s of series %s: %s", item.sop_uid, item.series_uid, reason)
        self.spool.quarantine(item, reason, status=status)
        result.quarantined += 1
        result.message = reason

    def _fail_batch(
        self, items: list[SpoolItem], result: SeriesResult, message: str, *, permanent: bool
    ) -> SeriesResult:
        if permanent:
            for item in items:
                self._quarantine(item, result, message)
        else:
            result.retry = True
            result.message = message
        return result

    # ---- the spool ----------------------------------------------------------------------

    def drain_once(self, should_stop: Callable[[], bool] = lambda: False) -> DrainReport:
        """One pass: every due destination, its pending series oldest first."""
        report = DrainReport()
        for dest in self.config.destinations:
            state = self.state.setdefault(dest.name, DestinationState())
            now = self.clock()
            if now < state.next_attempt:
                report.pending += self.spool.pending_count(dest.name)
                wait = state.next_attempt - now
                report.next_due_s = wait if report.next_due_s is None else min(report.next_due_s, wait)
                continue
            for batch in self.spool.pending(dest.name):
                if should_stop():
                    return report
                result = self.send_series(dest, batch, should_stop)
                report.stored += result.stored
                report.quarantined += result.quarantined
                if result.stored:
                    state.failures = 0
                if result.retry:
                    state.failures += 1
                    delay = self.config.retry.delay(state.failures)
                    state.next_attempt = self.clock() + delay
                    state.last_error = result.message
                    report.errors.append(result.message)
                    report.next_due_s = delay if report.next_due_s is None else min(report.next_due_s, delay)
                    log.warning("%s; retry %d in %.1f s", result.message, state.failures, delay)
                    break
                log.info(
                    "series %s -> %s: %d stored, %d quarantined",
                    batch.series_uid,
                    dest.name,
                    result.stored,
                    result.quarantined,
                )
            report.pending += self.spool.pending_count(dest.name)
        return report

    def drain(self, *, timeout_s: float | None = None, stop: threading.Event | None = None) -> DrainReport:
        """Repeat :meth:`drain_once` (with back-off) until the spool is empty, timeout or stop."""
        deadline = None if timeout_s is None else self.clock() + timeout_s
        stop = stop or threading.Event()
        while True:
            report = self.drain_once(stop.is_set)
            if report.pending == 0 or stop.is_set():
                return report
            wait = report.next_due_s if report.next_due_s is not None else self.config.poll_interval_s
            if deadline is not None:
                left = deadline - self.clock()
                if left <= 0:
                    return report
                wait = min(wait, left)
            stop.wait(max(wait, 0.01))


@dataclass(frozen=True)
class EchoResult:
    """Outcome of a C-ECHO."""

    ok: bool
    message: str


def echo(dest: PacsDestination, config: DicomConfig | None = None) -> EchoResult:
    """C-ECHO the destination: association (with TLS when configured), echo, release."""
    config = config or DicomConfig(output_dir=Path(), spool_dir=Path())
    assoc = associate(dest, config)
    if not assoc.is_established:
        _, message = describe_failed_association(assoc, dest, config.connect_timeout_s)
        return EchoResult(False, message)
    try:
        response = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in response:
        return EchoResult(False, f"no C-ECHO response from {dest.label} (aborted or timed out)")
    status = int(response.Status)
    if status != 0:
        return EchoResult(False, f"C-ECHO to {dest.label} failed with status 0x{status:04X}")
    return EchoResult(True, f"C-ECHO to {dest.label}: success")
