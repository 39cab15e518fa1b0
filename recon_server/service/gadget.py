"""Gadgetron external Python gadget (gadgetron-python), in both Gadgetron modes.

``<execute name="recon_server.service.gadget" target="gadget" type="python"/>``
    Gadgetron runs ``python -m gadgetron <port> recon_server.service.gadget gadget`` per stream;
    :func:`gadget` reconstructs that stream on a worker of its own (state is rebuilt for every
    scan; the configuration's time limits and fallback apply as in the server).
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
(``pipeline.reconstruct_all``). The read -> assemble -> reconstruct -> send sequence is
:mod:`recon_server.service.stream`'s, shared with the MRD server.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from typing import Any

from gadgetron.external import Connection

from recon_server.mrd import wire
from recon_server.mrd.assemble import Assembler
from recon_server.mrd.client_config import config_properties, requested_method
from recon_server.ops import logs as ops_logs
from recon_server.ops import service_metrics
from recon_server.service.config import ServiceConfig
from recon_server.service.endpoint import Endpoint
from recon_server.service.stream import read_readouts, reconstruct_stream, report_failure
from recon_server.service.worker import ReconService, ReconWorker, Sink, worker_for

log = logging.getLogger(__name__)

__all__ = ["GadgetronListener", "config_properties", "gadget", "handle_connection", "send_error"]

LISTENER = "gadgetron"


def send_error(raw: Any, text: str) -> None:
    """Write ERROR (8): ``uint16 8 | uint64 len | text`` through a ``.write`` object."""
    for chunk in wire.encode_message(wire.Error(text)):
        raw.write(bytes(chunk))


def refusal_message(text: str) -> bytes:
    """What a Gadgetron the listener does not take reads: ERROR (8) + CLOSE."""
    msgs = (wire.Error(f"recon-server: ConnectionRefused: {text}"), wire.Close())
    return b"".join(bytes(chunk) for msg in msgs for chunk in wire.encode_message(msg))


class GadgetronReplies:
    """Answers to Gadgetron: IMAGE and ERROR (8); progress only in the log (Gadgetron's external
    protocol has no message for it); CLOSE comes from ``Connection.__exit__``."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def image(self, image: wire.Image) -> None:
        for chunk in wire.encode_message(image):
            self.conn.socket.write(chunk)

    def progress(self, text: str) -> None:
        pass

    def finish(self) -> None:
        pass

    def error(self, text: str) -> None:
        send_error(self.conn.socket, f"recon-server: {text}")


def handle_connection(
    conn: Connection,
    *,
    service: ReconService | None = None,
    limits: wire.WireLimits | None = None,
    image_dtype: str = "float32",
    calibration_lines: str = "auto",
    peer: object = "gadgetron",
) -> None:
    """Read one Gadgetron stream, reconstruct, send images; ERROR (8) on failure. CLOSE is
    sent by ``Connection.__exit__``. Without ``service`` a worker is made for this stream."""
    sock: socket.socket = conn.socket.socket
    stream = sock.makefile("rb", buffering=1 << 20)  # config and header are already consumed
    reader = wire.WireReader(stream, limits or wire.WireLimits())
    replies = GadgetronReplies(conn)
    own_worker: ReconWorker | None = None
    if service is None:
        config = ServiceConfig()
        own_worker = worker_for(config)
        service = ReconService(methods=config.method_for, worker=own_worker)
    try:
        started = time.perf_counter()
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
        read_readouts(reader, asm)
        reconstruct_stream(
            LISTENER,
            asm,
            reader,
            service,
            replies,
            peer=peer,
            started=started,
            method=method,
            image_dtype=image_dtype,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        report_failure(LISTENER, replies, peer, exc)
        if not isinstance(exc, (wire.ProtocolError, OSError)):
            _drain(reader)
    finally:
        stream.close()
        if own_worker is not None:
            own_worker.close()


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


class GadgetronListener(Endpoint):
    """``<connect port=...>`` side: accept loop, one thread per Gadgetron stream."""

    name = LISTENER
    title = "Gadgetron external listener"
    thread_prefix = "gt"

    def __init__(
        self, config: ServiceConfig, *, sinks: list[Sink] | None = None, worker: ReconWorker | None = None
    ) -> None:
        if config.gadgetron_port is None:
            raise ValueError("ServiceConfig.gadgetron_port is not set")
        super().__init__(
            config, (config.gadgetron_host, int(config.gadgetron_port)), sinks=sinks or (), worker=worker
        )

    @staticmethod
    def refusal(text: str) -> bytes:
        return refusal_message(text)

    def handle(self, conn: socket.socket, peer: object) -> None:
        with ops_logs.connection_context(peer):
            self._handle(conn, peer)

    def _handle(self, sock: socket.socket, peer: object) -> None:
        sock.settimeout(self.config.socket_timeout_s)
        try:
            conn = Connection(sock)  # reads CONFIG (2) and HEADER (3)
        except (AssertionError, ValueError, TypeError, AttributeError, struct.error, OSError) as exc:
            # gadgetron-python asserts the message order and parses the header eagerly.
            service_metrics.stream_failed(LISTENER, exc)
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
                peer=peer,
            )
