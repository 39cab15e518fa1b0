"""A listening endpoint: the socket, the shared accept loop and the reconstruction service behind it.

The MRD stream server and the Gadgetron ``<connect>`` listener are both an :class:`Endpoint`;
they differ in how a connection is read (:meth:`Endpoint.handle`) and what a refused client reads
(:meth:`Endpoint.refusal`).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence

from recon_server.recon.methods import METHODS
from recon_server.service import listener
from recon_server.service.config import ServiceConfig
from recon_server.service.worker import ReconService, ReconWorker, Sink, worker_for

log = logging.getLogger(__name__)


class Endpoint:
    """Bind ``(host, port)``, accept on :class:`~recon_server.service.listener.AcceptLoop`, one
    thread per connection; one worker (shared when given) reconstructs for every connection."""

    name = "endpoint"  # the metrics' listener label
    title = "endpoint"  # what the start-up log line calls it
    thread_prefix = "conn"

    def __init__(
        self,
        config: ServiceConfig,
        address: tuple[str, int],
        *,
        sinks: Sequence[Sink] = (),
        worker: ReconWorker | None = None,
    ) -> None:
        config.check_methods(METHODS)
        self.config = config
        self.worker = worker or worker_for(config)
        self.service = ReconService(methods=config.method_for, worker=self.worker, sinks=list(sinks))
        self._bind_to = address
        self._sock: socket.socket | None = None
        self._loop: listener.AcceptLoop | None = None
        self._stop = threading.Event()
        self.address: tuple[str, int] | None = None

    def handle(self, conn: socket.socket, peer: object) -> None:
        raise NotImplementedError

    @staticmethod
    def refusal(text: str) -> bytes:
        """The bytes a client the accept loop refuses (connection limit, address) reads."""
        raise NotImplementedError

    def bind(self) -> tuple[str, int]:
        host, port = self._bind_to
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family)
        self.address = self._sock.getsockname()[:2]
        return self.address

    def _accept_loop(self) -> listener.AcceptLoop:
        if self._sock is None:
            self.bind()
        assert self._sock is not None and self.address is not None
        log.info("%s listening on %s:%d", self.title, self.address[0], self.address[1])
        self._loop = listener.AcceptLoop(
            self._sock,
            self.handle,
            name=self.name,
            refusal=self.refusal,
            max_connections=self.config.max_connections,
            stream_deadline_s=self.config.stream_deadline_s,
            allowed=listener.parse_networks(self.config.allowed_clients),
            thread_prefix=self.thread_prefix,
            stop=self._stop,
        )
        return self._loop

    @property
    def accept_loop(self) -> listener.AcceptLoop | None:
        """The loop once started (for ``/healthz``: :func:`recon_server.service.listener.liveness`)."""
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
