"""Fixtures of the command-line tests: a minimal raw file, a free port, a tiny MRD peer."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from recon_server.mrd import ismrmrd_io, wire

HEADER = "<?xml version='1.0'?><ismrmrdHeader xmlns='http://www.ismrm.org/ISMRMRD'/>"


@pytest.fixture
def minimal_raw(tmp_path: Path) -> Path:
    """An ISMRMRD raw file with two acquisitions (enough to stream; not a reconstructable scan)."""
    path = tmp_path / "minimal.h5"
    data = [np.zeros((1, 4), dtype=np.complex64)] * 2
    ismrmrd_io.write_raw(path, HEADER, ismrmrd_io.new_acquisition_headers(2), data)
    return path


@pytest.fixture
def closed_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def image(index: int, value: float = 1.0) -> wire.Image:
    head = wire.new_image_head()
    head["matrix_size"] = (8, 8, 1)
    head["channels"] = 1
    head["data_type"] = ismrmrd.DATATYPE_FLOAT
    head["image_type"] = ismrmrd.IMTYPE_MAGNITUDE
    head["image_index"] = index
    head["image_series_index"] = 1
    meta = ismrmrd.Meta({"DataRole": "Image"}).serialize()
    return wire.Image(head=head, meta_xml=meta, data=np.full((1, 1, 8, 8), value, dtype=np.float32))


@pytest.fixture
def make_image() -> Callable[..., wire.Image]:
    """``make_image(index, value=1.0)``: an 8 x 8 float magnitude image of series 1."""
    return image


class FakeServer:
    """One connection on 127.0.0.1: reads the stream up to CLOSE, then sends ``reply`` and CLOSE.

    A ``threading.Event`` in ``reply`` is waited on (up to 10 s) before the messages after it
    are sent; ``waited`` records whether each was set in time.
    """

    def __init__(self, reply: list[object]) -> None:
        self.reply = reply
        self.waited: list[bool] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn, conn.makefile("rb") as rfile, conn.makefile("wb") as out:
            reader = wire.WireReader(rfile)
            while not isinstance(reader.read_message(), wire.Close):
                pass
            writer = wire.WireWriter(out)
            for item in self.reply:
                if isinstance(item, threading.Event):
                    self.waited.append(item.wait(10))
                else:
                    writer.send(item)  # type: ignore[arg-type]
            writer.send(wire.Close())

    def close(self) -> None:
        self.sock.close()
        self.thread.join(10)


@pytest.fixture
def fake_server() -> Iterator[Callable[[list[object]], FakeServer]]:
    servers: list[FakeServer] = []

    def start(reply: list[object]) -> FakeServer:
        servers.append(FakeServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
