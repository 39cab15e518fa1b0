"""Gadgetron external Python gadget (gadgetron-python), in both Gadgetron modes.

``<execute name="recon_server.service.gadget" target="gadget" type="python"/>``
    Gadgetron runs ``python -m gadgetron <port> recon_server.service.gadget gadget`` per stream;
    :func:`gadget` reconstructs on the calling thread (state is rebuilt for every scan).
``<connect port="18000"/>``
    ``recon-server serve --gadgetron-port 18000`` runs :class:`GadgetronListener`: a
    long-running accept loop (``gadgetron.external.listen`` accepts one connection over
    IPv6 only) that wraps each socket in gadgetron-python's ``Connection`` and shares one
    reconstruction worker, so models stay loaded between scans.

Stream: Gadgetron sends CONFIG (2, the ``<configuration>`` under ``<external>``), HEADER (3),
then Acquisitions (1008) or ReconData (1023), then CLOSE. gadgetron-python's ``Connection``
reads config and header; the items are read by this project's bounded codec
(:mod:`recon_server.mrd.wire`), because gadgetron-python treats an unknown id as a normal end
of stream and allocates whatever a length field asks. Images (1022) go back through the same
codec (gadgetron-python's array writer breaks under numpy 2; ours casts explicitly). On failure
the gadget sends ERROR (8) with the message, which gadgetron-python cannot do, and then the
``Connection`` sends CLOSE as usual.

Configuration properties read from the CONFIG XML (``<property name="method" value="..."/>``):
``method`` (a registry name) and ``contrast`` (label override), parsed by
:func:`recon_server.mrd.client_config.config_properties` (the stream server reads CONFIG_TEXT with
the same parser). A method that fails falls back to ``ServiceConfig.fallback_method``
(``pipeline.reconstruct_all``).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Any

from gadgetron.external import Connection

from recon_server.mrd import wire
from recon_server.mrd.assemble import Assembler
from recon_server.mrd.client_config import config_properties, requested_method
from recon_server.ops import logs as ops_logs
from recon_server.ops import service_metrics as metrics
from recon_server.recon.methods import METHODS
from recon_server.recon.pipeline import ReconService, ReconWorker, Sink, reconstruct_all
from recon_server.scan import KSpaceScan
from recon_server.service import listener
from recon_server.service.config import ServiceConfig
from recon_server.service.server import volume_to_images

log = logging.getLogger(__name__)

__all__ = ["GadgetronListener", "config_properties", "gadget", "handle_connection", "send_error"]


def send_error(raw: Any, text: str) -> None:
    """Write ERROR (8): ``uint16 8 | uint64 len | text`` through a ``.write`` object."""
    for chunk in wire.encode_message(wire.Error(text)):
        raw.write(bytes(chunk))


def refusal_message(text: str) -> bytes:
    """What a Gadgetron the listener does not take reads: ERROR (8) + CLOSE."""
    msgs = (wire.Error(f"recon-server: ConnectionRefused: {text}"), wire.Close())
    return b"".join(bytes(chunk) for msg in msgs for chunk in wire.encode_message(msg))


def _run_direct(scans: list[KSpaceScan], method: str | None) -> list:
    config = ServiceConfig()
    return [
        volume
        for s in scans
        for volume in reconstruct_all(
            s,
            method=method or config.method_for(s.contrast),
            device=config.device,
            fallback=config.fallback_method,
        )
    ]


def handle_connection(
    conn: Connection,
    *,
    service: ReconService | None = None,
    limits: wire.WireLimits | None = None,
    image_dtype: str = "float32",
    calibration_lines: str = "auto",
) -> None:
    """Read one Gadgetron stream, reconstruct, send images; ERROR (8) on failure. CLOSE is
    sent by ``Connection.__exit__``."""
    sock: socket.socket = conn.socket.socket
    stream = sock.makefile("rb", buffering=1 << 20)  # config and header are already consumed
    reader = wire.WireReader(stream, limits or wire.WireLimits())
    try:
        t0 = time.perf_counter()
        props = config_properties(conn.config)
        method = requested_method(props)  # ClientConfigError (a ValueError) for an unknown one
        header = bytes(conn.raw_bytes.header).decode("utf-8", errors="replace")
        asm = Assembler(
            header,
            config={"contrast": props["contrast"]} if "contrast" in props else None,
            calibration_lines=calibration_lines,
            limits=reader.limits,
        )
        ops_logs.set_measurement(asm.measurement_id)
        while True:
            msg = reader.read_message()
            if isinstance(msg, wire.Close):
                break
            if isinstance(msg, wire.Acquisition):
                asm.add(msg)
            elif isinstance(msg, wire.ReconData):
                asm.add_recon_data(msg)
            elif not isinstance(msg, wire.Waveform):
                raise wire.ProtocolError(f"unexpected {type(msg).__name__} message from Gadgetron")
        scans = asm.finish()
        metrics.scans_received(
            "gadgetron",
            scans=len(scans),
            readouts=asm.n_lines,
            nbytes=reader.bytes_read,
            seconds=time.perf_counter() - t0,
        )
        with metrics.in_service("gadgetron", len(scans)):
            volumes = service.run(scans, method=method) if service is not None else _run_direct(scans, method)
        metrics.volumes_done(volumes)
        t_send = time.perf_counter()
        count = 0
        for volume in volumes:
            for image in volume_to_images(volume, dtype=image_dtype):
                for chunk in wire.encode_message(image):
                    conn.socket.write(chunk)
                count += 1
        metrics.stream_done("gadgetron", images=count, send_seconds=time.perf_counter() - t_send)
        log.info("gadget stream: %d readouts, %d scan(s) reconstructed", asm.n_lines, len(scans))
    except (ValueError, RuntimeError, OSError) as exc:
        metrics.stream_failed("gadgetron", exc)
        log.error("gadget stream failed: %s: %s", type(exc).__name__, exc)
        try:
            send_error(conn.socket, f"recon-server: {type(exc).__name__}: {exc}")
        except OSError as send_exc:
            log.info("could not send ERROR to Gadgetron: %s", send_exc)
        if not isinstance(exc, (wire.ProtocolError, OSError)):
            _drain(reader)
    finally:
        stream.close()


def _drain(reader: wire.WireReader) -> None:
    """Read and drop the rest of the stream up to CLOSE, so Gadgetron can finish sending."""
    try:
        while not isinstance(reader.read_message(), wire.Close):
            pass
    except (ValueError, OSError):
        return


def gadget(connection: Connection) -> None:
    """``<execute>`` entry point: ``python -m gadgetron <port> recon_server.service.gadget gadget``."""
    handle_connection(connection)


class GadgetronListener:
    """``<connect port=...>`` side: accept loop, one thread per Gadgetron stream."""

    def __init__(
        self, config: ServiceConfig, *, sinks: list[Sink] | None = None, worker: ReconWorker | None = None
    ) -> None:
        if config.gadgetron_port is None:
            raise ValueError("ServiceConfig.gadgetron_port is not set")
        config.check_methods(METHODS)
        self.config = config
        self.worker = worker or ReconWorker(
            device=config.device, max_pending=config.max_pending_scans, fallback=config.fallback_method
        )
        self.service = ReconService(methods=config.method_for, worker=self.worker, sinks=sinks)
        self._sock: socket.socket | None = None
        self._loop: listener.AcceptLoop | None = None
        self._stop = threading.Event()
        self.address: tuple[str, int] | None = None

    def bind(self) -> tuple[str, int]:
        host = self.config.gadgetron_host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, int(self.config.gadgetron_port or 0)), family=family)
        self.address = self._sock.getsockname()[:2]
        return self.address

    def _accept_loop(self) -> listener.AcceptLoop:
        """The shared accept loop (:mod:`recon_server.service.listener`) with this listener's settings."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None and self.address is not None
        log.info("Gadgetron external listener on %s:%d", self.address[0], self.address[1])
        self._loop = listener.AcceptLoop.for_config(
            self._sock,
            self.handle,
            self.config,
            name="gadgetron",
            refusal=refusal_message,
            thread_prefix="gt",
            stop=self._stop,
        )
        return self._loop

    def start(self) -> tuple[str, int]:
        self._accept_loop().start()
        assert self.address is not None
        return self.address

    def serve_forever(self) -> None:
        self._accept_loop().serve_forever()

    def handle(self, sock: socket.socket, peer: object) -> None:
        with ops_logs.connection_context(peer):
            self._handle(sock, peer)

    def _handle(self, sock: socket.socket, peer: object) -> None:
        sock.settimeout(self.config.socket_timeout_s)
        try:
            conn = Connection(sock)  # reads CONFIG (2) and HEADER (3)
        except (AssertionError, ValueError, TypeError, AttributeError, struct.error, OSError) as exc:
            # gadgetron-python asserts the message order and parses the header eagerly.
            metrics.stream_failed("gadgetron", exc)
            log.error("Gadgetron stream from %s: bad config/header: %s: %s", peer, type(exc).__name__, exc)
            try:
                raw = wire.WireWriter(sock.makefile("wb"))
                raw.send(wire.Error(f"recon-server: bad config or header: {type(exc).__name__}: {exc}"))
                raw.send(wire.Close())
                raw.stream.close()  # type: ignore[union-attr]
            except OSError:
                pass
            sock.close()
            return
        with conn:
            handle_connection(
                conn,
                service=self.service,
                limits=self.config.limits,
                image_dtype=self.config.image_dtype,
                calibration_lines=self.config.calibration_lines,
            )

    def stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.stop()
        elif self._sock is not None:
            self._sock.close()
