"""The Gadgetron external gadget, driven by a stand-in for Gadgetron over loopback sockets.

The stand-in does what Gadgetron's external node does: CONFIG (2), HEADER (3), items
(acquisitions 1008, or ReconData 1023 written by gadgetron-python's own writer), CLOSE (4);
then it reads images (1022), ERROR (8) and CLOSE (4).
"""

from __future__ import annotations

import importlib
import os
import socket
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
from gadgetron.types import recon_data as gt

from recon_server.mrd import ismrmrd_io
from recon_server.mrd.assemble import Assembler
from recon_server.research import quality as metrics
from recon_server.service.config import ServiceConfig
from recon_server.service.gadget import GadgetronListener

REPO = Path(__file__).resolve().parents[3]
CONFIG = b'<configuration><property name="method" value="zero-filled"/></configuration>'
NRMSE_FULL = 0.26  # zero-filled of the fully sampled phantom; measured 0.196


def nrmse(image: np.ndarray, truth: np.ndarray) -> float:
    """NRMSE after the least-squares intensity scale (recon units are arbitrary)."""
    return metrics.nrmse(image, truth, fit_scale=True)


class _Sock:
    """gadgetron-python writers need ``.write``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, b: bytes) -> None:
        self.sock.sendall(bytes(b))


def _send_text(sock: socket.socket, mid: int, body: bytes) -> None:
    sock.sendall(struct.pack("<HI", mid, len(body)) + body)


def _send_acquisitions(sock: socket.socket, path: Path, *, channels: int | None = None) -> None:
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as dset:
        _send_text(sock, 2, CONFIG)
        _send_text(sock, 3, bytes(dset.read_xml_header()))
        for i in range(dset.number_of_acquisitions()):
            acq = dset.read_acquisition(i)
            if channels is not None:
                acq = ismrmrd.Acquisition.from_array(acq.data[:channels], center_sample=acq.center_sample)
            sock.sendall(struct.pack("<H", 1008) + acq.to_bytes())
    sock.sendall(struct.pack("<H", 4))


def _recon_data(path: Path) -> tuple[bytes, gt.ReconData]:
    """What BucketToBuffer would send: de-oversampled k-space [E0,E1,E2,CHA,N,S,LOC] + ref."""
    raw = ismrmrd_io.read_raw(path)
    asm = Assembler(raw.header_xml)
    for head, data in zip(raw.acquisition_headers, raw.data, strict=True):
        asm.add_line(head, data)
    (scan,) = asm.finish()
    k = scan.kspace[0]  # (coils, ky, kx)
    data = np.ascontiguousarray(np.transpose(k, (2, 1, 0))[:, :, None, :, None, None, None])
    heads = np.empty((64, 1, 1, 1, 1), dtype=object)
    for ky in range(64):
        h = ismrmrd.AcquisitionHeader()
        h.version, h.number_of_samples, h.center_sample, h.active_channels = 1, 64, 32, 4
        h.idx.kspace_encode_step_1 = ky
        heads[ky, 0, 0, 0, 0] = h
    buffer = gt.ReconBuffer(data, None, None, heads, gt.SamplingDescription())
    return raw.header_xml.encode(), gt.ReconData([gt.ReconBit(buffer, None)])


def _read_replies(sock: socket.socket) -> tuple[list[ismrmrd.Image], list[str], bool]:
    f = sock.makefile("rb")

    def read(n: int) -> bytes:
        data = f.read(n)
        if len(data) != n:
            raise EOFError
        return data

    images, errors = [], []
    while True:
        try:
            (mid,) = struct.unpack("<H", read(2))
        except EOFError:
            return images, errors, False
        if mid == 1022:
            images.append(ismrmrd.Image.deserialize_from(read))
        elif mid == 8:
            (n,) = struct.unpack("<Q", read(8))
            errors.append(read(n).decode())
        elif mid == 4:
            return images, errors, True
        else:
            raise AssertionError(f"Gadgetron rejects message id {mid} from an external peer")


def test_execute_mode_subprocess(shepp_truth, shepp_full: Path) -> None:
    """Gadgetron's <execute>: it listens, runs ``python -m gadgetron <port> module target``."""
    listener = socket.create_server(("localhost", 0))
    port = listener.getsockname()[1]
    env = {**os.environ, "GADGETRON_EXTERNAL_LOG_LEVEL": "INFO"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gadgetron", str(port), "recon_server.service.gadget", "gadget"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        listener.settimeout(120)
        sock, _ = listener.accept()
        with sock:
            _send_acquisitions(sock, shepp_full)
            images, errors, closed = _read_replies(sock)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        listener.close()
    assert errors == [] and closed
    assert len(images) == 1 and images[0].meta["ReconMethod"] == "zero-filled"
    assert nrmse(images[0].data[0, 0], shepp_truth(shepp_full)[0]) < NRMSE_FULL


@pytest.fixture(scope="module")
def gadget_listener() -> Iterator[tuple[str, int]]:
    listener = GadgetronListener(ServiceConfig(gadgetron_port=0, default_method="zero-filled"))
    address = listener.start()
    yield address
    listener.stop()
    listener.worker.close()


def test_connect_listener_recon_data(shepp_truth, gadget_listener: tuple[str, int], shepp_full: Path) -> None:
    header, recon = _recon_data(shepp_full)
    for _ in range(2):  # the listener keeps serving one stream after another
        with socket.create_connection(gadget_listener, timeout=60) as sock:
            _send_text(sock, 2, CONFIG)
            _send_text(sock, 3, header)
            gt.write_recon_data(_Sock(sock), recon)
            sock.sendall(struct.pack("<H", 4))
            images, errors, closed = _read_replies(sock)
        assert errors == [] and closed and len(images) == 1
        assert nrmse(images[0].data[0, 0], shepp_truth(shepp_full)[0]) < NRMSE_FULL


def test_connect_listener_acquisitions_and_errors(gadget_listener: tuple[str, int], shepp_full: Path) -> None:
    with socket.create_connection(gadget_listener, timeout=60) as sock:
        _send_acquisitions(sock, shepp_full, channels=3)  # header says 4 channels
        images, errors, closed = _read_replies(sock)
    assert images == [] and closed
    assert len(errors) == 1 and "has 3 channels but the header" in errors[0]
    with socket.create_connection(gadget_listener, timeout=60) as sock:
        _send_text(sock, 2, CONFIG)
        _send_text(sock, 3, b"<ismrmrdHeader><broken")
        images, errors, closed = _read_replies(sock)
    assert images == [] and len(errors) == 1 and "bad config or header" in errors[0]
    with socket.create_connection(gadget_listener, timeout=60) as sock:
        _send_acquisitions(sock, shepp_full)
        images, errors, closed = _read_replies(sock)
    assert errors == [] and closed and len(images) == 1


@pytest.mark.parametrize("name", ["recon_server_connect.xml", "recon_server_execute.xml"])
def test_gadgetron_configs_name_real_entry_points(name: str) -> None:
    root = ET.parse(REPO / "docker" / "gadgetron" / name).getroot()
    stream = root.find("stream")
    assert stream is not None
    classes = [g.findtext("classname") for g in stream.findall("gadget")]
    assert classes[:5] == [
        "NoiseAdjustGadget",
        "AsymmetricEchoAdjustROGadget",
        "RemoveROOversamplingGadget",
        "AcquisitionAccumulateTriggerGadget",
        "BucketToBufferGadget",
    ]
    external = stream.find("external")
    assert external is not None
    props = {p.get("name"): p.get("value") for p in external.iter("property")}
    assert props.get("method") in importlib.import_module("recon_server.recon.methods").METHODS
    execute, connect = external.find("execute"), external.find("connect")
    if execute is not None:
        module = importlib.import_module(execute.get("name", ""))
        assert callable(getattr(module, execute.get("target", "")))
        assert execute.get("type") == "python"
    else:
        assert connect is not None and 0 < int(connect.get("port", "0")) < 65536
