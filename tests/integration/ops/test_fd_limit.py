"""``recon-server serve`` under a file-descriptor limit of 64: idle clients exhaust it, the accept
loop survives (answers the clients it cannot serve), and serves a scan once they are gone."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from recon_server.mrd import wire
from recon_server.ops.service_metrics import parse_exposition
from recon_server.service import fuzz
from recon_server.service.stream import PROGRESS_PREFIX

FD_LIMIT = 64
IDLE_CLIENTS = 70  # more than the limit leaves room for


@dataclass
class Child:
    proc: subprocess.Popen
    mrd: tuple[str, int]
    http: str


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@pytest.fixture
def child(tmp_path: Path, serve_addresses: Callable) -> Iterator[Child]:
    log = (tmp_path / "serve.log").open("w")
    cmd = [sys.executable, "-m", "recon_server.cli", "serve", "--port", "0", "--http-port", "0"]
    cmd += ["--method", "zero-filled", "--max-connections", "500", "--failed-scans-dir", str(tmp_path / "f")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, preexec_fn=_limit_fds)
    mrd, http = serve_addresses(proc, tmp_path / "serve.log")
    try:
        yield Child(proc, mrd, http)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _scan(address: tuple[str, int]) -> tuple[list[str], list[wire.Image]]:
    scan = fuzz.valid_scan()
    texts, images = [], []
    with socket.create_connection(address, timeout=60) as sock:
        sock.sendall(fuzz.stream(scan))
        reader = wire.WireReader(sock.makefile("rb"))
        while not isinstance(msg := reader.read_message(), wire.Close):
            (texts if isinstance(msg, wire.Text) else images).append(msg)  # type: ignore[arg-type]
    texts = [t for t in texts if not t.text.startswith(PROGRESS_PREFIX)]  # type: ignore[attr-defined]
    return [t.text for t in texts], images  # type: ignore[attr-defined]


def test_serve_survives_running_out_of_file_descriptors(child: Child) -> None:
    assert _scan(child.mrd)[1], "no image before the test"
    idle = []
    for _ in range(IDLE_CLIENTS):
        idle.append(socket.create_connection(child.mrd, timeout=10))
    # The server holds what it can; the rest are answered "out of file descriptors" and closed.
    refused = 0
    deadline = time.monotonic() + 20
    pending = list(idle)
    while pending and time.monotonic() < deadline:
        for sock in list(pending):
            sock.settimeout(0.05)
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            pending.remove(sock)
            refused += 1
            assert not data or b"out of file descriptors" in data, data
        if refused and len(pending) + refused == IDLE_CLIENTS and len(pending) < FD_LIMIT - 4:
            break
    assert refused >= IDLE_CLIENTS - FD_LIMIT, refused
    for sock in idle:
        sock.close()
    time.sleep(0.5)  # the handlers see the end of their streams and free their descriptors
    texts, images = _scan(child.mrd)
    assert texts == [] and len(images) == 1
    status, text = _get(child.http + "/metrics")
    assert status == 200
    values = parse_exposition(text)
    assert values.get('recon_server_accept_errors_total{error="EMFILE",listener="mrd"}', 0) >= 1
    assert values.get('recon_server_connections_refused_total{listener="mrd",reason="descriptors"}', 0) >= 1
    assert values['recon_server_accept_loop_up{listener="mrd"}'] == 1
    assert _get(child.http + "/healthz") == (200, "ok\n")
    assert child.proc.poll() is None
