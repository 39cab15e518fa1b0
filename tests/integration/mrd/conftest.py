"""Shepp-Logan raw files (Debian ismrmrd tools, with truth), a running stream server, helpers."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import ismrmrd
import pytest

from recon_server.config import ServiceConfig
from recon_server.mrd.server import StreamServer

TOOL = "ismrmrd_generate_cartesian_shepp_logan"


def _generate(path: Path, *, accel: int = 1, calib: int = 0, coils: int = 4, matrix: int = 64) -> Path:
    if shutil.which(TOOL) is None:
        pytest.fail(f"{TOOL} not found: install the Debian package ismrmrd-tools (make deps)")
    cmd = [TOOL, "-m", str(matrix), "-c", str(coils), "-a", str(accel), "-n", "0.05", "-C", "-o", str(path)]
    if calib:
        cmd += ["-w", str(calib)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return path


@pytest.fixture(scope="session")
def shepp_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp("sl") / "full.h5")


@pytest.fixture(scope="session")
def shepp_accel2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp("sl") / "accel2.h5", accel=2, calib=16)


@pytest.fixture(scope="module")
def server() -> Iterator[StreamServer]:
    srv = StreamServer(ServiceConfig(port=0, default_method="zero-filled", socket_timeout_s=30))
    srv.start()
    yield srv
    srv.stop()


def read_exactly(sock_file) -> object:  # type: ignore[no-untyped-def]
    def read(n: int) -> bytes:
        data = sock_file.read(n)
        if len(data) != n:
            raise EOFError(f"wanted {n} bytes, got {len(data)}")
        return data

    return read


def read_gadgetron_replies(sock: socket.socket) -> tuple[list[ismrmrd.Image], list[str], bool]:
    """What Gadgetron does with an external peer's replies: images, ERROR (8) texts, CLOSE."""
    f = sock.makefile("rb")
    read = read_exactly(f)
    images, errors = [], []
    while True:
        try:
            (mid,) = struct.unpack("<H", read(2))  # type: ignore[operator]
        except EOFError:
            return images, errors, False
        if mid == 1022:
            images.append(ismrmrd.Image.deserialize_from(read))
        elif mid == 8:
            (n,) = struct.unpack("<Q", read(8))  # type: ignore[operator]
            errors.append(read(n).decode())  # type: ignore[operator]
        elif mid == 4:
            return images, errors, True
        else:
            raise AssertionError(f"Gadgetron would reject message id {mid} from an external peer")
