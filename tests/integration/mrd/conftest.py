"""A running stream server and Gadgetron-side reply reader (Shepp-Logan data: tests/conftest.py)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import ismrmrd
import pytest

from recon_server.service.config import ServiceConfig
from recon_server.service.server import StreamServer


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
