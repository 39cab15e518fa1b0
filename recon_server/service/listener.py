"""The accept loop both listeners share (MRD stream server, Gadgetron ``<connect>`` listener).

:class:`AcceptLoop` owns a listening socket and starts one handler thread per connection:

- **Every accept() error is survived.** Exhausted resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) back
  off (10 ms doubling to 0.5 s) and go on; errors of one pending connection (ECONNABORTED, EPROTO,
  EPERM, ...) are skipped at once. The first error of a burst is logged once, its end ("accepting
  again after N accept() error(s)") once more; every error is counted in
  ``recon_server_accept_errors_total{listener, error}``. While the process is out of file
  descriptors, a reserved descriptor is released to accept the waiting connection and answer it
  (``ERR ... out of file descriptors``) instead of leaving it hanging. Only a listening socket
  that is gone (EBADF, ENOTSOCK, EINVAL: closed or not listening) ends the loop; ``/healthz``
  then answers 503 (:func:`liveness`) and ``recon_server_accept_loop_up`` drops to 0.
- **At most ``max_connections`` connections per listener.** One more is accepted and answered at
  once with the listener's refusal (MRD: ``TEXT "ERR ConnectionRefused: ..."`` + CLOSE; Gadgetron:
  ERROR (8) + CLOSE) and closed.
- **A client address allow-list** (``allowed_clients``, CIDR networks; empty: anyone). Other
  addresses are closed at once without a reply.
- **A total deadline per stream** (``stream_deadline_s``) besides the per-read socket timeout:
  a client that drips a byte now and then is cut off (:class:`StreamSocket`).

Refused connections are counted in ``recon_server_connections_refused_total{listener, reason}``
(``limit``, ``descriptors``, ``thread``, ``not-allowed``) and logged at most once per 10 s.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import Counter, Gauge

from recon_server.ops.service_metrics import REGISTRY

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Handler = Callable[[socket.socket, object], None]

ACCEPT_ERRORS = Counter(
    "recon_server_accept_errors_total",
    "accept() errors the listener survived, by listener and errno name.",
    ("listener", "error"),
    registry=REGISTRY,
)
REFUSED = Counter(
    "recon_server_connections_refused_total",
    "Connections closed without being served, by listener and reason "
    "(limit, descriptors, thread, not-allowed).",
    ("listener", "reason"),
    registry=REGISTRY,
)
ACTIVE = Gauge(
    "recon_server_connections", "Connections being served now, by listener.", ("listener",), registry=REGISTRY
)
UP = Gauge(
    "recon_server_accept_loop_up",
    "1 while the listener's accept loop runs, 0 once it died.",
    ("listener",),
    registry=REGISTRY,
)

#: accept() errors that mean the process ran out of something: back off, then go on.
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors that mean the listening socket itself is gone: the loop ends.
FATAL = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL, errno.EOPNOTSUPP})
BACKOFF_S = (0.01, 0.5)  # first and longest pause after an EXHAUSTED error (doubling)
POLL_S = 0.5  # how often a waiting loop looks at its stop flag
REFUSAL_SEND_S = 1.0  # at most this long to write a refusal
LOG_EVERY_S = 10.0  # refusals of one kind are logged at most this often


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """CIDR networks (``10.1.0.0/16``, ``192.168.5.7``, ``fd00::/8``); ValueError naming a bad one."""
    nets = []
    for text in texts:
        try:
            nets.append(ipaddress.ip_network(str(text).strip(), strict=False))
        except ValueError:
            raise ValueError(f"allowed_clients entry {text!r} is not an IP address or CIDR network") from None
    return tuple(nets)


def client_allowed(peer: object, networks: Sequence[Network]) -> bool:
    """Whether the peer address (``(host, port, ...)``) lies in one of ``networks`` (empty: all)."""
    if not networks:
        return True
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    try:
        addr = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # an IPv4 client of a dual-stack socket
    return any(addr in net for net in networks)


class StreamDeadlineExceeded(TimeoutError):
    """The peer took longer than the stream deadline to send its stream."""


class StreamSocket(socket.socket):
    """An accepted connection whose reads end at a total deadline (``arm``), besides the
    per-read timeout ``settimeout`` sets: near the deadline each read waits only for what is
    left, then raises :class:`StreamDeadlineExceeded` (an OSError). After that the deadline is
    off, so the handler can still report the error and drain the socket. Peeks (``MSG_PEEK``,
    whether the client is still there) and reads after ``shutdown`` (the server's drain once it
    has answered) are not held to it: the deadline is for receiving the stream."""

    __slots__ = ("_deadline", "_deadline_s", "_read_timeout")

    def arm(self, deadline_s: float | None) -> None:
        self._deadline_s = deadline_s
        self._deadline = None if deadline_s is None else time.monotonic() + deadline_s
        self._read_timeout = self.gettimeout()

    def settimeout(self, value: float | None) -> None:
        self._read_timeout = value
        super().settimeout(value)

    def _before_read(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is None:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            self._expire()
        timeout = self._read_timeout
        if timeout is None or left < timeout:
            socket.socket.settimeout(self, left)

    def _expire(self) -> None:
        self._deadline = None
        socket.socket.settimeout(self, self._read_timeout)
        raise StreamDeadlineExceeded(
            f"the stream took longer than {self._deadline_s:g} s (stream_deadline_s); connection closed"
        )

    def _timed_out(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None and time.monotonic() >= deadline - 1e-3:
            self._expire()

    def shutdown(self, how: int) -> None:
        self._deadline = None
        super().shutdown(how)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if not flags & socket.MSG_PEEK:
            self._before_read()
        try:
            return super().recv(bufsize, flags)
        except TimeoutError:
            if not flags & socket.MSG_PEEK:
                self._timed_out()
            raise

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:  # type: ignore[no-untyped-def, override]
        if not flags & socket.MSG_PEEK:
            self._before_read()
        try:
            return super().recv_into(buffer, nbytes, flags)
        except TimeoutError:
            if not flags & socket.MSG_PEEK:
                self._timed_out()
            raise


class _Limited:
    """At most one log line per key and ``every_s``; the lines in between are counted."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def __call__(self, key: str, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._skipped.pop(key, 0)
        suffix = f" ({skipped} more like it since the last such line)" if skipped else ""
        log.log(level, message + suffix, *args)


def liveness(loops: Iterable[AcceptLoop | None]) -> tuple[bool, str]:
    """``(ok, detail)`` for ``/healthz``: not ok once one of the started accept loops has died."""
    started = [lp for lp in loops if lp is not None and (lp.alive or lp.died)]
    dead = [lp for lp in started if lp.died]
    if dead:
        return False, "; ".join(f"{lp.label}: accept loop died ({lp.error})" for lp in dead)
    return True, ", ".join(f"{lp.label}: {lp.active} connection(s)" for lp in started) or "no listener"


class AcceptLoop:
    """Accept connections on ``sock`` and run ``handler(conn, peer)`` on a thread each.

    ``refusal(reason)`` returns the bytes that tell a refused client why (the listener's
    protocol). The handler owns the connection; the loop closes it after the handler returns.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        *,
        name: str,
        refusal: Callable[[str], bytes],
        max_connections: int = 32,
        stream_deadline_s: float | None = None,
        allowed: Sequence[Network] = (),
        thread_prefix: str = "conn",
        stop: threading.Event | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.sock = sock
        self.handler = handler
        self.name = name
        self.refusal = refusal
        self.max_connections = max_connections
        self.stream_deadline_s = stream_deadline_s
        self.allowed = tuple(allowed)
        self.thread_prefix = thread_prefix
        host, port = sock.getsockname()[:2]
        self.label = f"{name} {host}:{port}"
        self.error: str | None = None
        self.active = 0
        self._lock = threading.Lock()
        self._stop = stop if stop is not None else threading.Event()  # set: stop accepting
        self._running = False
        self._died = False  # ended without stop(): /healthz reports it
        self._thread: threading.Thread | None = None
        self._burst = 0  # accept() errors since the last accepted connection
        self._burst_t0 = 0.0
        self._delay = BACKOFF_S[0]
        self._reserve: int | None = None
        self._log = _Limited()

    # ---------------------------------------------------------------- life cycle

    @property
    def alive(self) -> bool:
        """True while the loop runs (or is about to): False once it died or was stopped."""
        return self._running

    @property
    def died(self) -> bool:
        """True once the loop ended without :meth:`stop` (an accept error it cannot survive)."""
        return self._died

    def _register(self) -> None:
        self._running = True

    def start(self) -> AcceptLoop:
        """Run :meth:`serve_forever` in a daemon thread."""
        self._register()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name=f"{self.name}-accept")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting (connections being served go on) and close the listening socket."""
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a waiting poll() at once
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def serve_forever(self) -> None:
        """Accept until :meth:`stop`, or until the listening socket is gone (see the module)."""
        if self._stop.is_set():
            return
        self._register()
        UP.labels(listener=self.name).set(1)
        try:
            self.sock.setblocking(False)
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)  # ValueError: closed already
            self._reserve = _reserve_fd()
            while not self._stop.is_set():
                if not poller.poll(POLL_S * 1000):
                    continue
                if not self._accept_one():
                    break
        except Exception as exc:  # noqa: BLE001 - a bug here must show on /healthz, not vanish
            if not self._stop.is_set():
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("%s: the accept loop failed", self.label)
        finally:
            self._running = False
            UP.labels(listener=self.name).set(0)
            if self._reserve is not None:
                os.close(self._reserve)
                self._reserve = None
            if not self._stop.is_set():  # stopped on purpose: nothing for /healthz to report
                self._died = True
                log.error(
                    "%s: the accept loop ended (%s); no new connections are served", self.label, self.error
                )

    # ---------------------------------------------------------------- one connection

    def _accept_one(self) -> bool:
        """Accept and dispatch one connection; False when the loop must end."""
        try:
            conn, peer = self._accept()
        except BlockingIOError:
            return True  # another poll wake-up without a connection (or a client gone already)
        except InterruptedError:
            return True
        except OSError as exc:
            return self._accept_failed(exc)
        if self._burst:
            log.warning(
                "%s: accepting again after %d accept() error(s) in %.1f s",
                self.label,
                self._burst,
                time.monotonic() - self._burst_t0,
            )
            self._burst, self._delay = 0, BACKOFF_S[0]
        if not client_allowed(peer, self.allowed):
            REFUSED.labels(listener=self.name, reason="not-allowed").inc()
            self._log(
                "not-allowed", logging.WARNING, "%s: refused %s: not in allowed_clients", self.label, peer
            )
            _close(conn)
            return True
        with self._lock:
            full = self.active >= self.max_connections
            if not full:
                self.active += 1
        if full:
            self._refuse(
                conn,
                "limit",
                f"the server is serving its maximum of {self.max_connections} "
                "connections on this port; try again later",
            )
            return True
        conn.arm(self.stream_deadline_s)
        ACTIVE.labels(listener=self.name).inc()
        try:
            threading.Thread(
                target=self._serve, args=(conn, peer), daemon=True, name=f"{self.thread_prefix}-{peer}"
            ).start()
        except RuntimeError as exc:  # can't start new thread: out of memory or a task limit
            self._release()
            self._refuse(conn, "thread", f"the server cannot start a thread for this connection ({exc})")
            self._stop.wait(self._backoff())
        return True

    def _accept(self) -> tuple[StreamSocket, object]:
        """``socket.accept`` returning a :class:`StreamSocket` (blocking, CLOEXEC)."""
        fd, peer = self.sock._accept()  # type: ignore[attr-defined]
        conn = StreamSocket(self.sock.family, self.sock.type, self.sock.proto, fileno=fd)
        conn.setblocking(True)
        return conn, peer

    def _accept_failed(self, exc: OSError) -> bool:
        if self._stop.is_set():
            return False
        code = exc.errno or 0
        if code in FATAL:
            self.error = f"{type(exc).__name__}: {exc}"
            return False
        name = errno.errorcode.get(code, type(exc).__name__)
        ACCEPT_ERRORS.labels(listener=self.name, error=name).inc()
        if not self._burst:
            self._burst_t0 = time.monotonic()
            log.warning(
                "%s: accept() failed: %s (%s); backing off and going on (further errors of this burst "
                "are counted in recon_server_accept_errors_total)",
                self.label,
                exc,
                name,
            )
        self._burst += 1
        if code in (errno.EMFILE, errno.ENFILE):
            self._refuse_waiting()
        if code in EXHAUSTED:
            self._stop.wait(self._backoff())
        return True

    def _backoff(self) -> float:
        delay = self._delay
        self._delay = min(2 * delay, BACKOFF_S[1])
        return delay

    def _refuse_waiting(self) -> None:
        """Out of descriptors: free the reserved one, accept the waiting client, tell it, close."""
        if self._reserve is None:
            return
        os.close(self._reserve)
        self._reserve = None
        try:
            conn, _ = self._accept()
        except OSError:
            conn = None
        if conn is not None:
            self._refuse(conn, "descriptors", "the server is out of file descriptors; try again later")
        self._reserve = _reserve_fd()

    def _refuse(self, conn: socket.socket, reason: str, text: str) -> None:
        REFUSED.labels(listener=self.name, reason=reason).inc()
        self._log(reason, logging.WARNING, "%s: refused a connection: %s", self.label, text)
        try:
            conn.settimeout(REFUSAL_SEND_S)
            conn.sendall(self.refusal(text))
            conn.shutdown(socket.SHUT_WR)
            conn.setblocking(False)
            _discard_pending(conn)
        except OSError:
            pass
        _close(conn)

    def _serve(self, conn: socket.socket, peer: object) -> None:
        try:
            self.handler(conn, peer)
        except Exception:  # noqa: BLE001 - a handler bug ends its connection, never the listener
            log.exception("%s: connection from %s: internal error", self.label, peer)
        finally:
            _close(conn)
            self._release()

    def _release(self) -> None:
        with self._lock:
            self.active -= 1
        ACTIVE.labels(listener=self.name).dec()


def _reserve_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _discard_pending(conn: socket.socket, max_bytes: int = 1 << 20) -> None:
    """Read what the peer already sent (non-blocking socket: no waiting), so that closing is less
    likely to reset the connection before the peer has read the refusal."""
    got = 0
    while got < max_bytes:
        try:
            chunk = conn.recv(1 << 16)
        except OSError:
            return
        if not chunk:
            return
        got += len(chunk)


def _close(conn: socket.socket) -> None:
    try:
        conn.close()
    except OSError:
        pass
