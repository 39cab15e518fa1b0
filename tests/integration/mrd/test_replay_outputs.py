"""``recon-server replay`` outputs against a tiny real MRD server (a socket thread in the test).

The peer speaks the MRD framing with ``recon_server.mrd.wire``: it reads CONFIG_FILE, HEADER,
the JSON TEXT, every acquisition and CLOSE, then answers with what the test asks for.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest

from recon_server.cli.main import main
from recon_server.mrd import ismrmrd_io, wire
from recon_server.mrd.replay import NoImagesError, ReplayError, replay_file

Reply = list[wire.Message]


def _image(series: int, index: int, rows: int, cols: int, value: float, role: str = "Image") -> wire.Image:
    head = wire.new_image_head()
    head["matrix_size"] = (cols, rows, 1)
    head["channels"] = 1
    head["data_type"] = ismrmrd.DATATYPE_FLOAT
    head["image_type"] = ismrmrd.IMTYPE_MAGNITUDE
    head["image_index"] = index
    head["image_series_index"] = series
    meta = ismrmrd.Meta({"DataRole": role, "SeriesDescription": f"series {series}"}).serialize()
    data = np.full((1, 1, rows, cols), value, dtype=np.float32)
    data[0, 0, 0, 0] = value + index  # images of one series differ
    return wire.Image(head=head, meta_xml=meta, data=data)


class TinyServer:
    """One connection at a time on 127.0.0.1; records what the client sent."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.received: list[str] = []
        self.acquisitions = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                reader = wire.WireReader(conn.makefile("rb"))
                while True:
                    msg = reader.read_message()
                    self.received.append(type(msg).__name__)
                    if isinstance(msg, wire.Acquisition):
                        self.acquisitions += 1
                    if isinstance(msg, wire.Close):
                        break
                out = conn.makefile("wb")
                writer = wire.WireWriter(out)
                for message in self.reply:
                    writer.send(message, flush=False)
                writer.send(wire.Close())
                out.close()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def tiny_server() -> Iterator[Callable[[Reply], TinyServer]]:
    servers: list[TinyServer] = []

    def start(reply: Reply) -> TinyServer:
        servers.append(TinyServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


TWO_SIZES: Reply = [
    _image(1, 1, 64, 64, 10.0),
    _image(1, 2, 64, 64, 10.0),
    _image(2, 1, 48, 32, 20.0),
    _image(501, 1, 64, 64, 1.0, role="Quantitative"),
    wire.Text("OK two series"),
]


def test_images_of_two_sizes_are_all_saved(tiny_server, shepp_accel2: Path, tmp_path: Path) -> None:
    server = tiny_server(TWO_SIZES)
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "images.npy", np.zeros((1, 2, 2), np.float32))  # stale, from an earlier replay
    result = replay_file(shepp_accel2, host="127.0.0.1", port=server.port, out_dir=out, progress=False)
    raw = ismrmrd_io.read_raw(shepp_accel2)
    assert server.acquisitions == len(raw) and server.received[:2] == ["ConfigFile", "Header"]
    assert len(result.images) == 4 and result.texts == ["OK two series"]
    first, second, sd = (np.load(out / name) for name in ("images_1.npy", "images_2.npy", "sd_501.npy"))
    assert first.shape == (2, 64, 64) and first.dtype == np.float32
    assert second.shape == (1, 48, 32)
    np.testing.assert_array_equal(first[1], TWO_SIZES[1].data[0, 0])  # type: ignore[union-attr]
    np.testing.assert_array_equal(second[0], TWO_SIZES[2].data[0, 0])  # type: ignore[union-attr]
    assert sd.shape == (1, 64, 64)
    # images differ in size: no combined images.npy (the stale one is gone); sd.npy has one size
    assert not (out / "images.npy").exists()
    assert np.load(out / "sd.npy").shape == (1, 64, 64)
    # images.h5 holds all four: one ISMRMRD image group per series (a group holds one size)
    with h5py.File(out / "images.h5", "r") as f:
        assert sorted(f["dataset"]) == ["images_1", "images_2", "sd_501"]
    groups = {name: ismrmrd_io.read_images(out / "images.h5", name=name) for name in ("images_1", "images_2")}
    assert [len(g) for g in groups.values()] == [2, 1]
    assert groups["images_2"][0].data.shape == (1, 1, 48, 32)
    assert len(ismrmrd_io.read_images(out / "images.h5", name="sd_501")) == 1
    assert {p.name for p in result.files} == {
        "images_1.npy",
        "images_2.npy",
        "sd_501.npy",
        "sd.npy",
        "images.h5",
    }
    with pytest.raises(ReplayError, match="differ in size"):
        result.magnitude()


def test_one_size_keeps_images_npy(tiny_server, shepp_accel2: Path, tmp_path: Path) -> None:
    server = tiny_server(TWO_SIZES[:2])
    replay_file(shepp_accel2, host="127.0.0.1", port=server.port, out_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), np.load(tmp_path / "images_1.npy"))
    assert len(ismrmrd_io.read_images(tmp_path / "images.h5")) == 2  # one size: group dataset/images
    assert not (tmp_path / "sd.npy").exists()


def test_no_images_is_reported_as_such(tiny_server, shepp_accel2: Path, tmp_path: Path, capsys) -> None:
    server = tiny_server([])
    with pytest.raises(NoImagesError, match="^the server returned no images$"):
        replay_file(shepp_accel2, host="127.0.0.1", port=server.port, out_dir=tmp_path, progress=False)
    assert server.received[-1] == "Close"
    argv = ["replay", str(shepp_accel2), "--port", str(server.port), "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 1
    printed = capsys.readouterr().err
    assert printed == "recon-server replay: the server returned no images\n"
    assert not list(tmp_path.iterdir())


def test_server_error_is_still_a_server_error(
    tiny_server, shepp_accel2: Path, tmp_path: Path, capsys
) -> None:
    server = tiny_server([wire.Text("ERR ValueError: no usable calibration")])
    argv = ["replay", str(shepp_accel2), "--port", str(server.port), "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 1
    printed = capsys.readouterr().err
    assert printed == "recon-server replay: server error: ERR ValueError: no usable calibration\n"
