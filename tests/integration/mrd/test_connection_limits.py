"""Connections and failed-scan files under hostile clients, in-process (real loopback sockets)."""

from __future__ import annotations

import errno
import functools
import gc
import socket
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from recon_server.mrd import ismrmrd_io, wire
from recon_server.ops.http import OpsServer
from recon_server.ops.service_metrics import REGISTRY, parse_exposition
from recon_server.service import fuzz, listener
from recon_server.service.config import ServiceConfig
from recon_server.service.gadget import GadgetronListener
from recon_server.service.server import StreamServer

SCAN = fuzz.valid_scan()


def assert_serves(address: tuple[str, int]) -> None:
    texts, images = fuzz.exchange(address, fuzz.stream(SCAN), half_close=False)
    assert texts == [] and len(images) == 1, texts
    image = images[0].data[0, 0]
    assert np.corrcoef(image.ravel(), SCAN.phantom.ravel())[0, 1] > 0.99


def _metric(name: str) -> float:
    return parse_exposition(REGISTRY.render()).get(name, 0.0)


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    servers: list[StreamServer] = []

    def make(**fields: object) -> StreamServer:
        config = ServiceConfig(
            port=0,
            default_method="zero-filled",
            socket_timeout_s=20,
            **fields,  # type: ignore[arg-type]
        )
        srv = StreamServer(config)
        srv.start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


def test_ten_failing_streams_keep_ten_distinct_files(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kept_dir = tmp_path / "failed"
    srv = make_server(failed_scans_dir=kept_dir)
    long_id, newline_id = "M" * 300, "FAKE\n2026-01-01 00:00:00,000 ERROR forged\u202e\u0085/../x"
    told = []
    for i in range(12):
        mid = long_id if i == 10 else newline_id if i == 11 else "SAME_ID"
        xml = fuzz.header_xml(measurement_id=mid)
        payload = fuzz.encode([wire.ConfigFile("default"), wire.Header(xml), *SCAN.readouts[:4]])
        texts, _ = fuzz.exchange(srv.address, payload + b"\x09\x03" + bytes(8))  # unknown id 777
        assert len(texts) == 1 and "unknown or unsupported message id" in texts[0], texts
        assert "raw data kept on the server as " in texts[0], texts
        told.append(texts[0].rsplit("raw data kept on the server as ", 1)[1].rstrip(")"))
    files = sorted(p.name for p in kept_dir.iterdir())
    assert len(files) == 12 and sorted(told) == files
    for name in files:
        assert len(name) <= 160 and name.isascii() and name.isprintable() and "/" not in name
        assert not name.startswith(".")
    assert sum("M" * 64 in n for n in files) == 1
    assert sum("FAKE_" in n for n in files) == 1
    for name in files:  # each holds what arrived, replayable
        raw = ismrmrd_io.read_raw(kept_dir / name)
        assert len(raw.data) == 4
    assert_serves(srv.address)


def test_connections_beyond_the_maximum_are_told_and_closed(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(max_connections=2)
    before = _metric('recon_server_connections_refused_total{listener="mrd",reason="limit"}')
    idle = [socket.create_connection(srv.address, timeout=10) for _ in range(2)]
    try:
        time.sleep(0.3)
        t0 = time.perf_counter()
        texts, _ = fuzz.exchange(srv.address, fuzz.stream(SCAN), timeout=10)
        assert time.perf_counter() - t0 < 5
        assert (
            len(texts) == 1 and texts[0].startswith("ERR ConnectionRefused: ") and "maximum of 2" in texts[0]
        )
        assert _metric('recon_server_connections_refused_total{listener="mrd",reason="limit"}') == before + 1
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)  # the idle ones end (EOF) and free their places
    assert_serves(srv.address)


def test_allow_list(make_server) -> None:  # type: ignore[no-untyped-def]
    denied = make_server(allowed_clients=("10.0.0.0/8", "fd00::/8"))
    with socket.create_connection(denied.address, timeout=10) as sock:
        sock.sendall(fuzz.stream(SCAN)[:100])
        try:
            assert sock.recv(100) == b""  # closed without a word
        except ConnectionResetError:
            pass
    allowed = make_server(allowed_clients=("10.0.0.0/8", "127.0.0.0/8"))
    assert_serves(allowed.address)


def test_a_dripping_client_meets_the_stream_deadline(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(stream_deadline_s=1.5)
    payload = fuzz.stream(SCAN)
    t0 = time.perf_counter()
    with socket.create_connection(srv.address, timeout=10) as sock:
        reader = wire.WireReader(sock.makefile("rb"))
        sent = 0
        sock.settimeout(0.25)
        reply = None
        while reply is None and time.perf_counter() - t0 < 8:
            sock.sendall(payload[sent : sent + 1])  # one byte every 0.25 s: never idle for long
            sent += 1
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    sock.settimeout(5)
                    reply = reader.read_message()
            except TimeoutError:
                pass
    assert isinstance(reply, wire.Text) and reply.text.startswith("ERR StreamDeadlineExceeded"), reply
    assert 1.4 < time.perf_counter() - t0 < 5


def _gadgetron_refused(address: tuple[str, int]) -> list[str]:
    errors = []
    with socket.create_connection(address, timeout=10) as sock:
        stream = sock.makefile("rb")
        reader = wire.WireReader(stream)
        try:
            while True:
                msg = reader.read_message()
                if isinstance(msg, wire.Error):
                    errors.append(msg.text)
                elif isinstance(msg, wire.Close):
                    break
        except (ValueError, OSError):
            pass
    return errors


def test_gadgetron_listener_shares_the_limits() -> None:
    gt = GadgetronListener(
        ServiceConfig(port=0, gadgetron_port=0, default_method="zero-filled", max_connections=1)
    )
    gt.start()
    try:
        idle = socket.create_connection(gt.address, timeout=10)
        time.sleep(0.3)
        errors = _gadgetron_refused(gt.address)
        assert len(errors) == 1 and "ConnectionRefused" in errors[0] and "maximum of 1" in errors[0]
        idle.close()
    finally:
        gt.stop()


class _FlakyAccept:
    """Wraps a listening socket: the first accept() calls raise the given errors."""

    def __init__(self, loop: listener.AcceptLoop, errors: list[int]) -> None:
        self.errors = list(errors)
        self.real = loop._accept
        loop._accept = self  # type: ignore[method-assign]

    def __call__(self):  # type: ignore[no-untyped-def]
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, f"injected {errno.errorcode[code]}")
        return self.real()


def _healthz(ops: OpsServer) -> tuple[int, str]:
    assert ops.address is not None
    try:
        with urllib.request.urlopen(f"http://{ops.address[0]}:{ops.address[1]}/healthz", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_accept_errors_are_survived_and_a_dead_loop_shows_on_healthz(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server()
    loop = srv._loop
    assert loop is not None
    key = 'recon_server_accept_errors_total{error="%s",listener="mrd"}'
    transient = [errno.ENOBUFS, errno.ECONNABORTED, errno.EPROTO, errno.ENOMEM, errno.EPERM]
    before = {errno.errorcode[c]: _metric(key % errno.errorcode[c]) for c in [*transient, errno.EMFILE]}
    _FlakyAccept(loop, transient)
    assert_serves(srv.address)  # the pending connection waits through the errors, then is served
    # Out of descriptors: the reserved one is released to tell the waiting client, then it goes on.
    _FlakyAccept(loop, [errno.EMFILE])
    texts, _ = fuzz.exchange(srv.address, fuzz.stream(SCAN))
    assert len(texts) == 1 and "out of file descriptors" in texts[0], texts
    assert_serves(srv.address)
    for name, value in before.items():
        assert _metric(key % name) == value + 1, name
    ops = OpsServer(port=0, liveness={"accept_loops": functools.partial(listener.liveness, [loop])})
    ops.start()
    try:
        assert _healthz(ops) == (200, "ok\n")
        _FlakyAccept(loop, [errno.EBADF])
        with socket.create_connection(srv.address, timeout=10):
            for _ in range(50):
                if not loop.alive:
                    break
                time.sleep(0.05)
        status, body = _healthz(ops)
        assert status == 503 and "accept loop died" in body and "[Errno 9]" in body, body
        assert _metric('recon_server_accept_loop_up{listener="mrd"}') == 0
    finally:
        ops.stop()
        loop.stop()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_slice_65535_stream_gets_a_clear_error_and_memory_stays(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server()
    head = np.array(SCAN.readouts[1].head, dtype=SCAN.readouts[1].head.dtype)
    head["idx"]["slice"] = 65535
    bad = wire.Acquisition(head[()], SCAN.readouts[1].data, SCAN.readouts[1].traj)  # type: ignore[arg-type]
    payload = fuzz.stream(SCAN, readouts=[SCAN.readouts[0], bad, *SCAN.readouts[2:]])
    before, t0 = rss_bytes(), time.perf_counter()
    texts, images = fuzz.exchange(srv.address, payload)
    assert images == [] and len(texts) == 1 and "slice index 65535 beyond the header's 1 slice" in texts[0]
    assert time.perf_counter() - t0 < 5 and rss_bytes() - before < 64 << 20
    assert_serves(srv.address)


def test_huge_header_matrix_is_refused_before_the_readouts(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server()
    for matrix in (2048, 4096):
        xml = fuzz.header_xml(matrix=(matrix, matrix), channels=8)
        lines = [wire.Acquisition(a.head, np.zeros((8, matrix), np.complex64), a.traj) for a in SCAN.readouts]
        before, t0 = rss_bytes(), time.perf_counter()
        texts, _ = fuzz.exchange(srv.address, fuzz.stream(SCAN, header=xml, readouts=lines))
        assert len(texts) == 1 and "max_matrix" in texts[0], texts
        assert time.perf_counter() - t0 < 5 and rss_bytes() - before < 64 << 20


def test_a_failed_scan_is_freed_at_once(make_server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """No reference cycle keeps a failed stream's assembler (and its k-space) alive."""
    from recon_server.service import session as server_module

    made: list[weakref.ref] = []  # type: ignore[type-arg]

    class Tracked(server_module.Assembler):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr(server_module, "Assembler", Tracked)
    srv = make_server()
    head = np.array(SCAN.readouts[5].head, dtype=SCAN.readouts[5].head.dtype)
    head["idx"]["slice"] = 65535
    bad = wire.Acquisition(head[()], SCAN.readouts[5].data, SCAN.readouts[5].traj)  # type: ignore[arg-type]
    gc.collect()
    gc.disable()
    try:
        texts, _ = fuzz.exchange(srv.address, fuzz.stream(SCAN, readouts=[*SCAN.readouts[:5], bad]))
        assert len(texts) == 1 and "slice index" in texts[0]
        for _ in range(100):  # the handler thread finishes after its last reply
            if made and made[0]() is None:
                break
            time.sleep(0.02)
        assert made and made[0]() is None, "the failed scan's assembler is still alive"
    finally:
        gc.enable()
