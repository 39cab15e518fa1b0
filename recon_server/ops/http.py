"""Health and metrics over HTTP (stdlib ``http.server`` in a daemon thread).

Routes (GET only; anything else is 404/405):

``/healthz``  liveness: 200 ``ok`` while the process serves HTTP and every liveness check passes
              (the listeners' accept loops run, :func:`recon_server.service.listener.liveness`),
              else 503 with the failing checks' details.
``/readyz``   readiness: 200 when every check passes, else 503; the body is JSON
              ``{"ready": bool, "checks": {name: {"ok": bool, "detail": str}}}``.
``/metrics``  the registry in the Prometheus text format (``text/plain; version=0.0.4``), written by
              ``prometheus_client.generate_latest``.

Checks are plain callables returning ``(ok, detail)``; :func:`spool_writable`,
:func:`thread_alive` and :func:`queue_ready` build the usual ones. The endpoint binds
``127.0.0.1`` by default: metrics name measurement ids nowhere, but the port still belongs on a
management network only.
"""

from __future__ import annotations

import json
import logging
import socket
import tempfile
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from recon_server.ops.service_metrics import REGISTRY

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"


def spool_writable(folder: Path) -> Check:
    """Ready when ``folder`` exists (or can be made) and a file can be created in it."""

    def check() -> tuple[bool, str]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".readyz-"):
                pass
        except OSError as exc:
            return False, f"{folder} not writable: {exc}"
        return True, f"{folder} writable"

    return check


def queue_ready(worker: object, threshold: int, *, stuck_margin_s: float = 60.0) -> Check:
    """Not ready while more than ``threshold`` scans wait for the reconstruction worker, or while
    it is stuck (its job running past the method's time limit + ``stuck_margin_s``)."""

    def check() -> tuple[bool, str]:
        stuck = getattr(worker, "stuck", None)
        why = stuck(margin_s=stuck_margin_s) if callable(stuck) else ""
        if why:
            return False, f"reconstruction worker stuck: {why}"
        waiting = int(getattr(worker, "waiting", 0))
        return waiting <= threshold, f"{waiting} scans waiting (threshold {threshold})"

    return check


def thread_alive(name: str, alive: Callable[[], bool]) -> Check:
    def check() -> tuple[bool, str]:
        ok = bool(alive())
        return ok, f"{name} {'running' if ok else 'not running'}"

    return check


class OpsServer:
    """``OpsServer(host, port, checks={...}).start()`` -> (host, port); ``stop()`` at shutdown."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        checks: Mapping[str, Check] | None = None,
        registry: CollectorRegistry = REGISTRY,
        liveness: Mapping[str, Check] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.checks: dict[str, Check] = dict(checks or {})
        self.liveness: dict[str, Check] = dict(liveness or {})
        self.registry = registry
        self._httpd: ThreadingHTTPServer | None = None
        self.address: tuple[str, int] | None = None

    def alive(self) -> tuple[bool, list[str]]:
        """Every liveness check passes; else the details of those that fail."""
        ok, results = self._run(self.liveness)
        return ok, [f"{name}: {r['detail']}" for name, r in results.items() if not r["ok"]]

    def readiness(self) -> tuple[bool, dict[str, dict[str, object]]]:
        return self._run(self.checks)

    @staticmethod
    def _run(checks: Mapping[str, Check]) -> tuple[bool, dict[str, dict[str, object]]]:
        results: dict[str, dict[str, object]] = {}
        for name, check in checks.items():
            try:
                ok, detail = check()
            except Exception as exc:  # noqa: BLE001 - a broken check reports not-ready, never 500
                ok, detail = False, f"check failed: {type(exc).__name__}: {exc}"
            results[name] = {"ok": bool(ok), "detail": detail}
        return all(r["ok"] for r in results.values()), results

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        ops = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "recon-server-ops"

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - the http.server naming
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    alive, failing = ops.alive()
                    text = "ok\n" if alive else "not ok: " + "; ".join(failing) + "\n"
                    self._send(200 if alive else 503, text.encode(), "text/plain; charset=utf-8")
                elif path == "/readyz":
                    ready, results = ops.readiness()
                    body = json.dumps({"ready": ready, "checks": results}, indent=1).encode() + b"\n"
                    self._send(200 if ready else 503, body, "application/json")
                elif path == "/metrics":
                    self._send(200, generate_latest(ops.registry), CONTENT_TYPE_METRICS)
                else:
                    self._send(404, b"not found: try /healthz, /readyz, /metrics\n", "text/plain")

            do_HEAD = do_GET  # noqa: N815

            def do_POST(self) -> None:  # noqa: N802
                self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"GET only\n", "text/plain")

            do_PUT = do_DELETE = do_POST  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("%s %s", self.address_string(), format % args)

        return Handler

    def start(self) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = family

        self._httpd = Server((self.host, self.port), self._handler())
        host, port = self._httpd.server_address[:2]
        self.address = (str(host), int(port))
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="ops-http").start()
        log.info("health and metrics on http://%s:%d (/healthz /readyz /metrics)", *self.address)
        return self.address

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
