"""Standalone MRD stream server (``recon-server serve``, default 127.0.0.1:9002).

Speaks to ``gadgetron_ismrmrd_client``, ismrmrd-python's ProtocolSerializer and Siemens
FIRE / OpenRecon clients. One stream, one scan session::

    client -> server   CONFIG_FILE (1) or CONFIG_TEXT (2)   optional (XML <property> or JSON)
                       HEADER (3)                             ISMRMRD XML
                       TEXT (5)                               optional JSON ("method", "contrast",
                                                              or FIRE's {"parameters": {...}})
                       ACQUISITION (1008) / WAVEFORM (1026, ignored) / RECON_DATA (1023) ...
                       CLOSE (4)
    server -> client   TEXT (5) "PROGRESS <label> <method>: slice k/n, ..." while reconstructing
                       IMAGE (1022) per slice, float32 or uint16 magnitude, meta XML
                       CLOSE (4)

Client configuration conventions: :mod:`recon_server.mrd.client_config`. A configuration the
server cannot run (an unknown ``method``, ``samples`` out of range) is answered with ``ERR`` as
soon as it arrives, before the readouts are uploaded, and such a stream is not kept as a failed
scan. A CONFIG_FILE name that is not a method is logged as a warning naming the method used.

Returned images carry, as Gadgetron's do, the readouts' ``measurement_uid``, each slice's
position and directions, ``patient_table_position``, ``acquisition_time_stamp`` and
``physiology_time_stamp`` (of the slice's first imaging readout). Images a fallback method made
(``pipeline``) carry meta ``Fallback`` = ``"<configured> -> <fallback>: <reason>"`` and
``ImageComments``.

Errors: the server logs one line, sends ``TEXT "ERR <message>"`` (every client above reads
TEXT; FIRE treats the ``ERR`` prefix as an error level, gadgetron_ismrmrd_client prints it),
then CLOSE, closes that connection and keeps serving. (ERROR (8) goes only to Gadgetron, by
the external gadget.) Each connection runs in its own thread; reconstructions go through
one :class:`~recon_server.service.worker.ReconWorker` queue.
"""

from __future__ import annotations

import collections
import functools
import logging
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from recon_server.mrd import ismrmrd_io, wire
from recon_server.mrd.client_config import ClientConfigError, unknown_config_names
from recon_server.ops import logs as ops_logs
from recon_server.ops import service_metrics
from recon_server.recon.pipeline import ReconCancelled
from recon_server.service.config import ServiceConfig
from recon_server.service.endpoint import Endpoint
from recon_server.service.journal import RECEIVING, Journal, JournalEntry, move_unique, safe_name_part
from recon_server.service.journal import recover as journal_recover
from recon_server.service.session import StreamSession
from recon_server.service.stream import PROGRESS_PREFIX, reconstruct_stream, report_failure
from recon_server.service.worker import ReconWorker, ServiceStopping, Sink

log = logging.getLogger(__name__)


class MrdReplies:
    """The MRD server's answers: TEXT ``PROGRESS ...``, IMAGE, TEXT ``ERR ...`` + CLOSE.

    Progress arrives on the worker thread; it is only queued there and written by the connection
    thread (:meth:`send_progress`, from the wait's poll and before the images), so one thread
    writes the socket and a slow client never holds the worker.
    """

    def __init__(self, writer: wire.WireWriter) -> None:
        self.writer = writer
        self._progress: collections.deque[str] = collections.deque(maxlen=64)

    def progress(self, text: str) -> None:
        self._progress.append(text)

    def send_progress(self) -> None:
        sent = False
        while self._progress:
            self.writer.send(wire.Text(PROGRESS_PREFIX + self._progress.popleft()), flush=False)
            sent = True
        if sent:
            self.writer.flush()

    def image(self, image: wire.Image) -> None:
        self.send_progress()
        self.writer.send(image, flush=False)

    def finish(self) -> None:
        self.send_progress()
        self.writer.send(wire.Close())

    def error(self, text: str) -> None:
        self._progress.clear()
        self.writer.send(wire.Text(f"ERR {text}"), flush=False)
        self.writer.send(wire.Close())


class StreamServer(Endpoint):
    """The MRD stream server: one thread per connection, one reconstruction worker shared by all."""

    name = "mrd"
    title = "MRD stream server"
    thread_prefix = "mrd"

    def __init__(
        self,
        config: ServiceConfig,
        *,
        sinks: Sequence[Sink] = (),
        worker: ReconWorker | None = None,
        journal: Journal | None = None,
    ):
        super().__init__(config, (config.host, config.port), sinks=sinks, worker=worker)
        if journal is None and config.journal_dir is not None:
            journal = Journal(config.journal_dir, failed_dir=config.failed_scans_dir)
        self.journal = journal
        self._active: dict[socket.socket, StreamSession] = {}  # connections being served
        self._shutting_down = threading.Event()
        self._shutdown_deadline: float | None = None

    @staticmethod
    def refusal(text: str) -> bytes:
        return refusal_message(text)

    def stop(self) -> None:
        self.stop_accepting()
        self.worker.close()

    def _keep_failed(self, session: StreamSession, exc: Exception) -> Path | None:
        """Write what arrived of a failed scan as an ISMRMRD raw file (if configured and any came).

        The name is ``<time>-<measurement id, sanitised and bounded>-<random token>.h5``
        (``service.journal.safe_name_part``); the file is written under a hidden temporary name and
        hard-linked to its name, so it never replaces another (``service.journal.move_unique``).
        """
        folder = self.config.failed_scans_dir
        if folder is None or not session.header_xml or not session.acquisitions:
            return None
        if isinstance(exc, ClientConfigError):
            return None  # a configuration the server refused, not a failed scan
        measurement = session.assembler.measurement_id if session.assembler else ""
        stem = f"{time.strftime('%Y%m%dT%H%M%S')}-{safe_name_part(measurement)}"
        acqs = session.acquisitions
        partial = folder / f".partial-{uuid.uuid4().hex}.h5"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            ismrmrd_io.write_raw(
                partial,
                session.header_xml,
                np.array([a.head for a in acqs], dtype=ismrmrd_io.ACQUISITION_HEADER_DTYPE),
                [a.data for a in acqs],
                trajectories=[a.traj for a in acqs],
            )
            path = move_unique(partial, folder, stem)
        except (OSError, ValueError) as error:
            log.error("could not keep the failed scan's raw data in %s: %s", folder, error)
            return None
        finally:
            partial.unlink(missing_ok=True)
        log.warning("failed scan kept: %s (%d readouts; replay it with recon-server replay)", path, len(acqs))
        return path

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down.is_set()

    def shutdown(self, grace_s: float = 10.0) -> None:
        """SIGTERM: stop accepting; running streams get ``grace_s`` to finish (docs/service.md
        "Durability"), then waiting ones are answered ``ERR server shutting down`` (their scan
        stays in the journal) and receiving ones are cut (kept as failed)."""
        self._shutdown_deadline = time.monotonic() + grace_s
        self._shutting_down.set()
        self.stop_accepting()
        while self._active and time.monotonic() < self._shutdown_deadline:
            time.sleep(0.05)
        for conn in list(self._active):
            try:
                conn.shutdown(socket.SHUT_RD)  # the reader sees the end of the stream
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        while self._active and time.monotonic() < deadline:
            time.sleep(0.05)

    def recover(self, reconciled: Iterable[str] = ()) -> None:
        """Finish the journal left by an earlier process (:func:`recon_server.service.journal.recover`)."""
        if self.journal is None:
            return

        def run(scans: list, entry: JournalEntry) -> None:  # type: ignore[type-arg]
            record = entry.record
            with ops_logs.connection_context(f"journal:{entry.id}"):
                ops_logs.set_measurement(str(record.get("measurement", "")))
                self.service.run(
                    scans,
                    method=record.get("method"),
                    samples=record.get("samples"),
                    delivery=entry,
                    poll=self._poll_shutdown,
                )

        counts = journal_recover(self.journal, run if self.service.sinks else None, reconciled=reconciled)
        if any(counts.values()):
            log.info(
                "journal after the restart: %d scan(s) delivered, %d kept as failed",
                counts["delivered"],
                counts["failed"],
            )

    def _poll_shutdown(self) -> None:
        deadline = self._shutdown_deadline
        if deadline is not None and time.monotonic() >= deadline:
            raise ServiceStopping("server shutting down")

    def _poll(self, conn: socket.socket, replies: MrdReplies) -> None:
        """While a connection waits for its reconstruction: the end of the grace period, or the
        client gone when no sink wants the images."""
        self._poll_shutdown()
        if not self.service.sinks and peer_gone(conn):
            raise ReconCancelled("the client closed the connection before its images were ready")
        try:
            replies.send_progress()
        except (OSError, ValueError) as exc:  # the peer left: the sinks still get the images
            log.debug("progress not sent: %s", exc)

    def _finish_entry(self, session: StreamSession) -> None:
        """The images went to every sink: drop the journal entry, or keep the scan as failed."""
        entry, session.entry = session.entry, None
        if entry is None:
            return
        if entry.complete:
            entry.remove()
        else:
            entry.fail(f"outputs failed: {entry.output_error() or 'nothing delivered'}")

    def _keep(self, session: StreamSession, exc: Exception) -> Path | None:
        """Keep a failed scan's raw data: the journal entry moves to the failed scans, or (no
        journal) what arrived is written there."""
        entry, session.entry = session.entry, None
        if entry is None:
            return self._keep_failed(session, exc)
        if isinstance(exc, ClientConfigError):
            entry.remove()  # a configuration the server refused, not a failed scan
            return None
        return entry.fail(f"{type(exc).__name__}: {' '.join(str(exc).split())}")

    def _report_shutdown(
        self, replies: MrdReplies, peer: object, *, journaled: bool = False, kept: Path | None = None
    ) -> None:
        service_metrics.STREAMS.labels(listener="mrd", outcome="shutdown").inc()
        if journaled:
            note = "; the scan is kept and reconstructed when the server is back"
        elif kept is not None:
            note = f" (raw data kept on the server as {kept.name})"
        else:
            note = ""
        log.warning("stream from %s: server shutting down%s", peer, note)
        try:
            replies.error(f"server shutting down{note}")
        except OSError as exc:
            log.info("could not tell %s: %s", peer, exc)

    def _warn_unknown_config(self, session: StreamSession, scans: Sequence[object]) -> None:
        """One warning when the client named a configuration that is not a method here."""
        names = unknown_config_names(session.options, session.config_name)
        if names:
            used = sorted({self.config.method_for(getattr(scan, "contrast", "")) for scan in scans})
            log.warning(
                "configuration %s is not a reconstruction method of this server; using %s instead",
                " / ".join(repr(n) for n in names),
                ", ".join(used) or self.config.default_method,
            )

    def handle(self, conn: socket.socket, peer: object) -> None:
        """Serve one stream; every failure becomes ``TEXT "ERR ..."`` + CLOSE to the peer."""
        with ops_logs.connection_context(peer):
            self._handle(conn, peer)

    def _handle(self, conn: socket.socket, peer: object) -> None:
        conn.settimeout(self.config.socket_timeout_s)
        reader = wire.WireReader(conn.makefile("rb", buffering=1 << 20), self.config.limits)
        writer = wire.WireWriter(conn.makefile("wb", buffering=1 << 20))
        replies = MrdReplies(writer)
        session = StreamSession(
            reader,
            keep_acquisitions=self.journal is None and self.config.failed_scans_dir is not None,
            calibration_lines=self.config.calibration_lines,
            journal=self.journal,
            allowed_methods=self.config.client_methods(),
            peer=peer,
        )
        self._active[conn] = session
        try:
            self._serve(session, conn, peer, replies)
        except ServiceStopping:
            # Received in full but not reconstructed: a restart reconstructs it from the journal.
            if session.entry is not None:
                session.entry.leave()
            self._report_shutdown(replies, peer, journaled=session.entry is not None)
        except ReconCancelled as exc:  # the client went away and no sink wants the images
            service_metrics.stream_failed("mrd", exc)
            log.warning("stream from %s: %s; reconstruction dropped", peer, exc)
            self._keep(session, exc)
        except (ValueError, OSError, RuntimeError) as exc:  # ProtocolError is a ValueError
            receiving = session.entry is None or session.entry.state == RECEIVING
            if self._shutting_down.is_set() and receiving and not isinstance(exc, ClientConfigError):
                self._report_shutdown(replies, peer, kept=self._keep(session, exc))
            else:
                self._report_failure(replies, peer, exc, self._keep(session, exc))
        except Exception as exc:  # noqa: BLE001 - the connection boundary: a bug must not go unreported
            log.exception("stream from %s: internal error", peer)
            self._report_failure(replies, peer, exc, self._keep(session, exc))
        finally:
            self._active.pop(conn, None)
            for stream in (reader.stream, writer.stream):
                try:
                    stream.close()  # type: ignore[union-attr]
                except OSError:
                    pass
            close_gracefully(conn)

    def _serve(self, session: StreamSession, conn: socket.socket, peer: object, replies: MrdReplies) -> None:
        started = time.perf_counter()
        asm = session.read()
        if session.entry is not None:
            session.entry.seal(method=session.method, samples=session.samples, options=session.options)
        reconstruct_stream(
            "mrd",
            asm,
            session.reader,
            self.service,
            replies,
            peer=peer,
            started=started,
            method=session.method,
            samples=session.samples,
            delivery=session.entry,
            poll=functools.partial(self._poll, conn, replies),
            image_dtype=self.config.image_dtype,
            on_scans=None
            if session.method is not None
            else functools.partial(self._warn_unknown_config, session),
            on_delivered=functools.partial(self._finish_entry, session),
        )

    @staticmethod
    def _report_failure(replies: MrdReplies, peer: object, exc: Exception, kept: Path | None = None) -> None:
        note = f" (raw data kept on the server as {kept.name})" if kept else ""
        # A refused configuration reads "ERR ValueError: ..." on the wire, as it always has.
        name = "ValueError" if isinstance(exc, ClientConfigError) else type(exc).__name__
        report_failure("mrd", replies, peer, exc, note, name=name)


def refusal_message(text: str) -> bytes:
    """What a client the server does not take reads: ``TEXT "ERR ConnectionRefused: ..."`` + CLOSE."""
    msgs = (wire.Text(f"ERR ConnectionRefused: {text}"), wire.Close())
    return b"".join(bytes(chunk) for msg in msgs for chunk in wire.encode_message(msg))


def close_gracefully(conn: socket.socket, *, drain_s: float = 1.0, max_drain: int = 64 << 20) -> None:
    """Half-close, then discard what the peer still sends (bounded) so that our last bytes
    (the error text, CLOSE) are not lost to a TCP reset, and close."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(drain_s)
        drained = 0
        while drained < max_drain:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass
    finally:
        conn.close()


def peer_gone(conn: socket.socket) -> bool:
    """True when the peer closed (or reset) the connection; bytes waiting mean it is still there.

    Looks without blocking (``poll`` with no wait, then a one-byte ``MSG_PEEK``).
    """
    poller = select.poll()
    try:
        poller.register(conn, select.POLLIN | select.POLLERR | select.POLLHUP)
        if not poller.poll(0):
            return False
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True
