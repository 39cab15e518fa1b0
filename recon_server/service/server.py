"""Standalone MRD stream server (``recon-server serve``, default 127.0.0.1:9002).

Speaks to ``gadgetron_ismrmrd_client``, ismrmrd-python's ProtocolSerializer and Siemens
FIRE / OpenRecon clients. One stream, one scan session::

    client -> server   CONFIG_FILE (1) or CONFIG_TEXT (2)   optional (XML <property> or JSON)
                       HEADER (3)                             ISMRMRD XML
                       TEXT (5)                               optional JSON ("method", "contrast",
                                                              or FIRE's {"parameters": {...}})
                       ACQUISITION (1008) / WAVEFORM (1026, ignored) / RECON_DATA (1023) ...
                       CLOSE (4)
    server -> client   IMAGE (1022) per slice, float32 or uint16 magnitude, meta XML
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
one :class:`~recon_server.recon.pipeline.ReconWorker` queue.
"""

from __future__ import annotations

import functools
import json
import logging
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import ismrmrd
import numpy as np

from recon_server.dicom.writer import dicom_series_description
from recon_server.mrd import ismrmrd_io, wire
from recon_server.mrd.assemble import Assembler
from recon_server.mrd.client_config import (
    ClientConfigError,
    json_options,
    requested_method,
    text_options,
    unknown_config_names,
)
from recon_server.ops import logs as ops_logs
from recon_server.ops import service_metrics as metrics
from recon_server.recon.methods import METHODS
from recon_server.recon.pipeline import (
    ReconCancelled,
    ReconService,
    ReconWorker,
    ServiceStopping,
    Sink,
    fallback_note,
)
from recon_server.scan import ImageVolume
from recon_server.service import listener
from recon_server.service.config import MAX_POSTERIOR_SAMPLES, ServiceConfig
from recon_server.service.journal import RECEIVING, Journal, JournalEntry, move_unique, safe_name_part
from recon_server.service.journal import recover as journal_recover

log = logging.getLogger(__name__)


def volume_to_images(volume: ImageVolume, *, dtype: str = "float32") -> list[wire.Image]:
    """One ISMRMRD magnitude image per slice, with meta: series description, window, image type,
    method and its settings (JSON), model name and version."""
    images = []
    mag = volume.magnitude
    if dtype == "uint16":
        data = np.clip(np.rint(mag), 0, 65535).astype(np.uint16)
    else:
        data = mag.astype(np.float32)
    prov = volume.provenance
    settings = json.dumps(prov.settings, sort_keys=True, default=str)
    model = {"ModelName": prov.model_name, "ModelVersion": prov.model_version} if prov.model_name else {}
    note = fallback_note(prov)
    fallback = (
        {
            "Fallback": note,
            "ImageComments": f"Fallback reconstruction ({prov.method}): "
            f"{prov.settings['fallback_from']} failed: {prov.settings.get('fallback_reason', '')}",
        }
        if note
        else {}
    )
    for i, geom in enumerate(volume.geometry):
        head = wire.new_image_head()
        head["measurement_uid"] = volume.measurement_uid
        head["field_of_view"] = geom.fov_mm
        head["position"], head["read_dir"] = geom.position, geom.read_dir
        head["phase_dir"], head["slice_dir"] = geom.phase_dir, geom.slice_dir
        head["patient_table_position"] = geom.table_position
        head["acquisition_time_stamp"] = geom.acquisition_time_stamp
        head["physiology_time_stamp"] = geom.physiology_time_stamp
        head["slice"] = geom.slice_index
        head["image_type"] = ismrmrd.IMTYPE_MAGNITUDE
        head["image_index"] = i + 1
        head["image_series_index"] = volume.series_index
        meta = ismrmrd.Meta(
            {
                # An SD map is a quantitative companion of the image series, not a second image.
                "DataRole": "Image" if volume.role == "image" else "Quantitative",
                "ImageProcessingHistory": ["RECON-SERVER", volume.provenance.method.upper()],
                "SeriesDescription": dicom_series_description(volume),
                "SequenceDescriptionAdditional": volume.provenance.method,
                "ImageType": "\\".join(volume.image_type),
                "WindowCenter": f"{volume.window_center:.3f}",
                "WindowWidth": f"{volume.window_width:.3f}",
                "ReconMethod": volume.provenance.method,
                "ReconSettings": settings,
                "Contrast": volume.contrast,
                **model,
                **fallback,
            }
        )
        images.append(wire.Image(head=head, meta_xml=meta.serialize(), data=data[i][None, None]))
    return images


def samples_override(options: dict) -> int | None:
    """Posterior samples asked for by the client's JSON (``{"samples": 8}``, a JSON integer), bounded."""
    value = options.get("samples")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_POSTERIOR_SAMPLES:
        raise ClientConfigError(f"samples must be an integer in 1..{MAX_POSTERIOR_SAMPLES}, got {value!r}")
    return value


def method_override(config_name: str, options: dict) -> str | None:
    """A method named by the client (:func:`recon_server.mrd.client_config.requested_method`)."""
    return requested_method(options, config_name)


MAX_CONFIG_MESSAGES = 16  # CONFIG / TEXT messages accepted before the HEADER


class StreamSession:
    """Reads one client stream into scans: config, header, optional JSON, readouts, CLOSE.

    The client's choice (``method``, ``samples``) is checked as each configuration message
    arrives: :class:`ClientConfigError` ends the stream there, before the readouts.
    """

    def __init__(
        self,
        reader: wire.WireReader,
        *,
        keep_acquisitions: bool = False,
        calibration_lines: str = "auto",
        journal: Journal | None = None,
        allowed_methods: frozenset[str] | None = None,
        peer: object = "",
    ) -> None:
        self.reader = reader
        self.journal = journal
        self.entry: JournalEntry | None = None  # this stream's raw data on disk (mrd.journal)
        self.allowed_methods = allowed_methods  # what a client may ask for (None: any)
        self.peer = peer
        self.calibration_lines = calibration_lines
        self.config_name = ""
        self.options: dict = {}
        self.method: str | None = None
        self.samples: int | None = None
        self.assembler: Assembler | None = None
        self.header_xml = ""
        # With keep_acquisitions, every readout is also kept as it arrived, so that a scan whose
        # reconstruction fails can be written to disk and replayed later (not lost).
        self.acquisitions: list[wire.Acquisition] | None = [] if keep_acquisitions else None

    def _configure(self, options: dict | None = None) -> None:
        if options:
            self.options.update(options)
            if self.assembler is not None:
                self.assembler.config = self.options
        self.method = requested_method(self.options, self.config_name)
        if self.method is not None and self.allowed_methods is not None:
            if self.method not in self.allowed_methods:
                raise ClientConfigError(
                    f"method {self.method!r} may not be requested by a client on this server (allowed: "
                    f"{', '.join(sorted(self.allowed_methods))}; the administrator enables more with "
                    "[recon] allowed_client_methods)"
                )
        self.samples = samples_override(self.options)

    def read(self) -> Assembler:
        reader = self.reader
        msg = reader.read_message()
        for _ in range(MAX_CONFIG_MESSAGES):
            if isinstance(msg, wire.ConfigFile):
                self.config_name = msg.name.strip().rstrip("\0").strip()
                self._configure()
            elif isinstance(msg, wire.ConfigText):
                self.config_name = "config-text"
                self._configure(text_options(msg.text))
            elif isinstance(msg, wire.Text):
                self._configure(json_options(msg.text))
            else:
                break
            msg = reader.read_message()
        if not isinstance(msg, wire.Header):
            raise wire.ProtocolError(f"expected the ISMRMRD HEADER (3), got {type(msg).__name__}")
        self.header_xml = msg.xml
        asm = Assembler(
            msg.xml, config=self.options, calibration_lines=self.calibration_lines, limits=reader.limits
        )
        ops_logs.set_measurement(asm.measurement_id)  # every later log line of this stream
        self.assembler = asm
        if self.journal is not None:
            self.entry = self.journal.begin(msg.xml, measurement=asm.measurement_id, peer=str(self.peer))
        while True:
            msg = reader.read_message()
            if isinstance(msg, wire.Acquisition):
                if self.acquisitions is not None:
                    self.acquisitions.append(msg)
                if self.entry is not None:
                    self.entry.append(msg)
                asm.add(msg)
            elif isinstance(msg, wire.Close):
                return asm
            elif isinstance(msg, wire.Waveform):
                continue
            elif isinstance(msg, wire.Text):
                if asm.n_lines == 0:
                    self._configure(json_options(msg.text))
            elif isinstance(msg, wire.ReconData):
                if self.entry is not None:  # an ISMRMRD raw file holds acquisitions only
                    self.entry.remove()
                    self.entry = None
                asm.add_recon_data(msg)
            else:
                raise wire.ProtocolError(f"unexpected {type(msg).__name__} message inside a scan")


class StreamServer:
    """Accept loop; one thread per connection; one reconstruction worker shared by all."""

    def __init__(
        self,
        config: ServiceConfig,
        *,
        sinks: Sequence[Sink] = (),
        worker: ReconWorker | None = None,
        journal: Journal | None = None,
    ):
        config.check_methods(METHODS)
        self.config = config
        self.worker = worker or ReconWorker(
            device=config.device,
            max_pending=config.max_pending_scans,
            fallback=config.fallback_method,
            time_limit=config.time_limit_for,
        )
        if journal is None and config.journal_dir is not None:
            journal = Journal(config.journal_dir, failed_dir=config.failed_scans_dir)
        self.journal = journal
        self._active: dict[socket.socket, StreamSession] = {}  # connections being served
        self._shutting_down = threading.Event()
        self._shutdown_deadline: float | None = None
        self.service = ReconService(methods=config.method_for, worker=self.worker, sinks=list(sinks))
        self._sock: socket.socket | None = None
        self._loop: listener.AcceptLoop | None = None
        self._stop = threading.Event()
        self.address: tuple[str, int] | None = None

    def bind(self) -> tuple[str, int]:
        sock = socket.create_server((self.config.host, self.config.port), reuse_port=False)
        self._sock = sock
        self.address = sock.getsockname()[:2]
        return self.address

    def _accept_loop(self) -> listener.AcceptLoop:
        """The shared accept loop (:mod:`recon_server.service.listener`) with this server's settings."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None and self.address is not None
        log.info("MRD stream server listening on %s:%d", self.address[0], self.address[1])
        self._loop = listener.AcceptLoop.for_config(
            self._sock,
            self.handle,
            self.config,
            name="mrd",
            refusal=refusal_message,
            thread_prefix="mrd",
            stop=self._stop,
        )
        return self._loop

    def serve_forever(self) -> None:
        """Accept connections on this thread until :meth:`stop`."""
        self._accept_loop().serve_forever()

    def start(self) -> tuple[str, int]:
        """Bind and serve in a background thread; returns the bound address."""
        self._accept_loop().start()
        assert self.address is not None
        return self.address

    def stop_accepting(self) -> None:
        """Close the listening socket; connections being served go on."""
        self._stop.set()
        if self._loop is not None:
            self._loop.stop()
        elif self._sock is not None:
            self._sock.close()

    def stop(self) -> None:
        self.stop_accepting()
        self.worker.close()

    def _keep_failed(self, session: StreamSession, exc: Exception) -> Path | None:
        """Write what arrived of a failed scan as an ISMRMRD raw file (if configured and any came).

        The name is ``<time>-<measurement id, sanitised and bounded>-<random token>.h5``
        (``mrd.journal.safe_name_part``); the file is written under a hidden temporary name and
        hard-linked to its name, so it never replaces another (``mrd.journal.move_unique``).
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

    def _poll(self, conn: socket.socket) -> None:
        """While a connection waits for its reconstruction: the end of the grace period, or the
        client gone when no sink wants the images."""
        self._poll_shutdown()
        if not self.service.sinks and peer_gone(conn):
            raise ReconCancelled("the client closed the connection before its images were ready")

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
        self, writer: wire.WireWriter, peer: object, *, journaled: bool = False, kept: Path | None = None
    ) -> None:
        metrics.STREAMS.inc(listener="mrd", outcome="shutdown")
        if journaled:
            note = "; the scan is kept and reconstructed when the server is back"
        elif kept is not None:
            note = f" (raw data kept on the server as {kept.name})"
        else:
            note = ""
        log.warning("stream from %s: server shutting down%s", peer, note)
        try:
            writer.send(wire.Text(f"ERR server shutting down{note}"), flush=False)
            writer.send(wire.Close())
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

    @staticmethod
    def _report_failure(
        writer: wire.WireWriter, peer: object, exc: Exception, kept: Path | None = None
    ) -> None:
        """Count and log the failure, then tell the peer (TEXT ``ERR ...`` + CLOSE) if it still listens."""
        metrics.stream_failed("mrd", exc)
        # A refused configuration reads "ERR ValueError: ..." on the wire, as it always has.
        name = "ValueError" if isinstance(exc, ClientConfigError) else type(exc).__name__
        # The text, not the exception: a handler that keeps records (a queue, a test's capture)
        # would keep its traceback's frames, and the failed scan's buffers with them, alive.
        log.error("stream from %s failed: %s: %s", peer, name, str(exc))
        note = f" (raw data kept on the server as {kept.name})" if kept else ""
        try:
            writer.send(wire.Text(f"ERR {name}: {exc}{note}"), flush=False)
            writer.send(wire.Close())
        except OSError as send_exc:
            log.info("could not report the error to %s: %s", peer, send_exc)

    def handle(self, conn: socket.socket, peer: object) -> None:
        """Serve one stream; every failure becomes ``TEXT "ERR ..."`` + CLOSE to the peer."""
        with ops_logs.connection_context(peer):
            self._handle(conn, peer)

    def _handle(self, conn: socket.socket, peer: object) -> None:
        conn.settimeout(self.config.socket_timeout_s)
        reader = wire.WireReader(conn.makefile("rb", buffering=1 << 20), self.config.limits)
        writer = wire.WireWriter(conn.makefile("wb", buffering=1 << 20))
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
            t0 = time.perf_counter()
            asm = session.read()
            method, samples = session.method, session.samples
            if session.entry is not None:
                session.entry.seal(method=method, samples=samples, options=session.options)
            scans = asm.finish()
            if method is None:
                self._warn_unknown_config(session, scans)
            metrics.scans_received(
                "mrd",
                scans=len(scans),
                readouts=asm.n_lines,
                nbytes=reader.bytes_read,
                seconds=time.perf_counter() - t0,
            )
            with metrics.in_service("mrd", len(scans)):
                volumes = self.service.run(
                    scans,
                    method=method,
                    samples=samples,
                    delivery=session.entry,
                    poll=functools.partial(self._poll, conn),
                )
            metrics.volumes_done(volumes)
            self._finish_entry(session)
            t_send = time.perf_counter()
            count = 0
            for volume in volumes:
                for image in volume_to_images(volume, dtype=self.config.image_dtype):
                    writer.send(image, flush=False)
                    count += 1
            writer.send(wire.Close())
            metrics.stream_done("mrd", images=count, send_seconds=time.perf_counter() - t_send)
            log.info(
                "stream from %s: %d readouts, %.1f MB, %d scan(s), %d images sent",
                peer,
                asm.n_lines,
                reader.bytes_read / 1e6,
                len(scans),
                count,
            )
        except ServiceStopping:
            # Received in full but not reconstructed: a restart reconstructs it from the journal.
            if session.entry is not None:
                session.entry.leave()
            self._report_shutdown(writer, peer, journaled=session.entry is not None)
        except ReconCancelled as exc:  # the client went away and no sink wants the images
            metrics.stream_failed("mrd", exc)
            log.warning("stream from %s: %s; reconstruction dropped", peer, exc)
            self._keep(session, exc)
        except (ValueError, OSError, RuntimeError) as exc:  # ProtocolError is a ValueError
            receiving = session.entry is None or session.entry.state == RECEIVING
            if self._shutting_down.is_set() and receiving and not isinstance(exc, ClientConfigError):
                self._report_shutdown(writer, peer, kept=self._keep(session, exc))
            else:
                self._report_failure(writer, peer, exc, self._keep(session, exc))
        except Exception as exc:  # noqa: BLE001 - the connection boundary: a bug must not go unreported
            log.exception("stream from %s: internal error", peer)
            self._report_failure(writer, peer, exc, self._keep(session, exc))
        finally:
            self._active.pop(conn, None)
            for stream in (reader.stream, writer.stream):
                try:
                    stream.close()  # type: ignore[union-attr]
                except OSError:
                    pass
            close_gracefully(conn)


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
