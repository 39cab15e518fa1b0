"""The shared accept loop's pieces: the stream deadline socket, stop, liveness."""

from __future__ import annotations

import socket
import time

import pytest

from recon_server.service import listener


def _pair() -> tuple[listener.StreamSocket, socket.socket]:
    a, b = socket.socketpair()
    server = listener.StreamSocket(a.family, a.type, a.proto, fileno=a.detach())
    return server, b


def test_reads_end_at_the_stream_deadline_but_peeks_and_the_drain_do_not() -> None:
    server, client = _pair()
    with server, client:
        server.settimeout(30)
        server.arm(0.3)
        client.sendall(b"ab")
        assert server.recv(1) == b"a"
        t0 = time.perf_counter()
        assert server.recv(1) == b"b"
        with pytest.raises(listener.StreamDeadlineExceeded, match="0.3 s"):
            server.recv(1)  # nothing more comes: the read waits only until the deadline
        assert 0.2 < time.perf_counter() - t0 < 2
        server.arm(0.05)
        time.sleep(0.1)
        client.sendall(b"c")
        assert server.recv(1, socket.MSG_PEEK) == b"c"  # a peek is not held to it
        server.shutdown(socket.SHUT_WR)  # the server answered: its drain is not held to it
        assert server.recv(1) == b"c"


def test_stop_ends_the_loop_and_leaves_liveness_clean() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    loop = listener.AcceptLoop(sock, lambda conn, peer: None, name="test", refusal=lambda text: b"")
    loop.start()
    assert loop.alive and listener.liveness([loop])[0]
    t0 = time.perf_counter()
    loop.stop()
    assert loop._thread is not None
    loop._thread.join(5)
    assert not loop._thread.is_alive() and time.perf_counter() - t0 < 2
    assert listener.liveness([loop]) == (True, "no listener")  # stopped on purpose: not dead


def test_parse_networks_refuses_bad_entries() -> None:
    with pytest.raises(ValueError, match="allowed_clients entry 'scanner.local'"):
        listener.parse_networks(["10.0.0.0/8", "scanner.local"])
