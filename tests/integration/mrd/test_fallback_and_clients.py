"""Issue 13 over real sockets: images come back through the fallback method, third-party client
conventions (python-ismrmrd-server's client.py, FIRE / OpenRecon), the early ERR, and the
acquisition header fields the returned images carry."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolDeserializer, ProtocolSerializer

from recon_server.ops import service_metrics as ops_metrics
from recon_server.recon import methods
from recon_server.service.config import ServiceConfig
from recon_server.service.gadget import GadgetronListener
from recon_server.service.server import StreamServer
from recon_server.service.stream import PROGRESS_PREFIX

from .conftest import read_gadgetron_replies


def _read_file(path: Path) -> tuple[ismrmrd.xsd.ismrmrdHeader, list[ismrmrd.Acquisition]]:
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as dset:
        header = ismrmrd.xsd.CreateFromDocument(dset.read_xml_header())
        acqs = [dset.read_acquisition(i) for i in range(dset.number_of_acquisitions())]
    return header, acqs


def _client(
    path: Path,
    address: tuple[str, int],
    *,
    config: object = None,
    text: str | None = None,
) -> tuple[list[ismrmrd.Image], list[str]]:
    """A client written against the protocol: config (CONFIG_FILE / CONFIG_TEXT), HEADER,
    optional JSON TEXT, readouts, CLOSE; then every reply until CLOSE."""
    header, acqs = _read_file(path)
    with socket.create_connection(address, timeout=60) as sock:
        ser = ProtocolSerializer(sock.makefile("wb"))
        if config is not None:
            ser.serialize(config)
        ser.serialize(header)
        if text is not None:
            ser.serialize(text)
        for acq in acqs:
            ser.serialize(acq)
        ser.close()
        images: list[ismrmrd.Image] = []
        texts: list[str] = []
        for item in ProtocolDeserializer(sock.makefile("rb")).deserialize():
            if not str(item).startswith(PROGRESS_PREFIX):  # the server's progress lines
                (images if isinstance(item, ismrmrd.Image) else texts).append(item)
    return images, texts


@pytest.fixture(scope="module")
def zf_server() -> Iterator[StreamServer]:
    srv = StreamServer(ServiceConfig(port=0, default_method="zero-filled", socket_timeout_s=30))
    srv.start()
    yield srv
    srv.stop()


# ------------------------------------------------------------------------------ fallback


def _fallback_count(reason: str = "model-missing") -> float:
    return ops_metrics.REGISTRY.value(
        "recon_server_fallbacks_total", method="dps-fast", fallback="cg-sense", reason=reason
    )


def test_missing_model_falls_back_to_cg_sense_with_marked_images(
    shepp_full: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "no-model"
    monkeypatch.setenv(methods.MODEL_DIR_ENV, str(missing))
    kept = tmp_path / "failed"
    srv = StreamServer(
        ServiceConfig(
            port=0, default_method="dps-fast", model_dir=missing, failed_scans_dir=kept, socket_timeout_s=30
        )
    )
    srv.start()
    before = _fallback_count()
    try:
        assert srv.address is not None
        with caplog.at_level(logging.WARNING):
            images, texts = _client(shepp_full, srv.address, config=ConfigFile("default"))
    finally:
        srv.stop()
    assert texts == [] and len(images) == 1
    meta = images[0].meta
    assert meta["ReconMethod"] == "cg-sense"
    assert meta["ImageProcessingHistory"] == ["RECON-SERVER", "CG-SENSE"]
    assert meta["Fallback"].startswith("dps-fast -> cg-sense: model-missing: ValueError: model directory")
    assert str(missing) in meta["Fallback"]
    assert meta["ImageComments"].startswith("Fallback reconstruction (cg-sense): dps-fast failed:")
    assert "(fallback: cg-sense)" in meta["SeriesDescription"]
    settings = json.loads(meta["ReconSettings"])
    assert settings["fallback_from"] == "dps-fast"
    assert settings["fallback_reason"].startswith("model-missing: ValueError: ")
    assert _fallback_count() == before + 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "fallback" in r.getMessage()]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert "dps-fast" in line and "cg-sense" in line and "model-missing" in line
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)
    assert not kept.exists()  # images came back: nothing to keep


def test_fallback_none_fails_the_scan(
    shepp_full: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(methods.MODEL_DIR_ENV, str(tmp_path / "no-model"))
    srv = StreamServer(
        ServiceConfig(port=0, default_method="dps-fast", fallback_method="none", socket_timeout_s=30)
    )
    srv.start()
    try:
        assert srv.address is not None
        images, texts = _client(shepp_full, srv.address)
    finally:
        srv.stop()
    assert images == [] and len(texts) == 1 and texts[0].startswith("ERR ValueError: model directory")


def _start_serve(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, dict[str, str]]:
    """``recon-server serve`` in a subprocess; returns it and the addresses it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "recon_server.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    found: dict[str, str] = {}
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "mrd" not in found:
        line = proc.stdout.readline()
        if not line:
            break
        if m := re.search(r"health and metrics on (http://\S+)", line):
            found["http"] = m.group(1)
        if m := re.search(r"MRD stream server on (\S+):(\d+)", line):
            found["mrd"] = f"{m.group(1)}:{m.group(2)}"
    if "mrd" not in found:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"serve did not start: {err}")
    return proc, found


def test_serve_config_with_unloadable_model_sends_fallback_images_and_counts_them(
    shepp_full: Path, tmp_path: Path
) -> None:
    """The whole service from its TOML file: dps-fast whose checkpoint does not load."""
    model = tmp_path / "broken-model"
    model.mkdir()
    (model / "card.json").write_text('{"name": "broken"}')  # passes the start check, fails to load
    toml = tmp_path / "recon-server.toml"
    toml.write_text(
        '[server]\nport = 0\n\n[recon]\ndefault_method = "dps-fast"\nfallback_method = "cg-sense"\n'
        f'model_dir = "{model}"\n\n[ops]\nhttp_port = 0\n'
    )
    env = {k: v for k, v in os.environ.items() if k != methods.MODEL_DIR_ENV}
    proc, found = _start_serve(["--config", str(toml)], env)
    try:
        host, port = found["mrd"].rsplit(":", 1)
        images, texts = _client(shepp_full, (host, int(port)))
        # The server counts the stream after its CLOSE has gone out: wait for it (bounded).
        ok = 'recon_server_streams_total{listener="mrd",outcome="ok"}'
        deadline = time.monotonic() + 20
        while True:
            with urllib.request.urlopen(found["http"] + "/metrics", timeout=30) as resp:
                exposition = ops_metrics.parse_exposition(resp.read().decode())
            if ok in exposition or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert texts == [] and len(images) == 1, texts
    assert images[0].meta["ReconMethod"] == "cg-sense"
    assert images[0].meta["Fallback"].startswith("dps-fast -> cg-sense: model-missing: ")
    key = 'recon_server_fallbacks_total{fallback="cg-sense",method="dps-fast",reason="model-missing"}'
    assert exposition[key] == 1
    assert exposition['recon_server_streams_total{listener="mrd",outcome="ok"}'] == 1
    fallback_lines = [line for line in err.splitlines() if "reconstructing with the fallback method" in line]
    assert len(fallback_lines) == 1 and "WARNING" in fallback_lines[0] and "dps-fast" in fallback_lines[0]


def test_serve_on_cuda_without_cuda_refuses_to_start_with_one_line() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    done = subprocess.run(
        [sys.executable, "-m", "recon_server.cli", "serve", "--device", "cuda", "--port", "0", "--no-http"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", built without CUDA")
    assert done.returncode == 2
    assert done.stderr == (
        f"recon-server serve: error: device 'cuda': CUDA is not available on this host ({build}); "
        "use --device cpu\n"
    )
    assert done.stdout == ""


# ------------------------------------------------------------------- third-party clients


@pytest.mark.parametrize("name", ["invertcontrast", "simplefft", "null"])
def test_unknown_config_file_name_is_a_warning_naming_the_method_used(
    zf_server: StreamServer, shepp_full: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    assert zf_server.address is not None
    with caplog.at_level(logging.WARNING, logger="recon_server.service.server"):
        images, texts = _client(shepp_full, zf_server.address, config=ConfigFile(name))
    assert texts == [] and len(images) == 1
    assert images[0].meta["ReconMethod"] == "zero-filled"
    (record,) = [
        r for r in caplog.records if r.name == "recon_server.service.server" and r.levelno >= logging.WARNING
    ]
    assert record.levelno == logging.WARNING
    assert repr(name) in record.getMessage() and "using zero-filled instead" in record.getMessage()


def test_config_file_naming_a_method_selects_it(zf_server: StreamServer, shepp_full: Path) -> None:
    assert zf_server.address is not None
    images, _ = _client(shepp_full, zf_server.address, config=ConfigFile("cg-sense.xml"))
    assert images[0].meta["ReconMethod"] == "cg-sense"


FIRE_TEXTS = {
    "parameters.config": ({"parameters": {"config": "cg-sense", "customconfig": ""}}, "cg-sense", ""),
    "parameters.method + contrast": (
        {"parameters": {"method": "cg-sense", "contrast": "t2"}},
        "cg-sense",
        "T2",
    ),
    "top level": ({"method": "cg-sense", "contrast": "T1"}, "cg-sense", "T1"),
    "top level beats parameters": (
        {"method": "zero-filled", "parameters": {"method": "cg-sense", "contrast": "FLAIR"}},
        "zero-filled",
        "FLAIR",
    ),
}


@pytest.mark.parametrize("case", list(FIRE_TEXTS))
def test_fire_openrecon_json_text(zf_server: StreamServer, shepp_full: Path, case: str) -> None:
    assert zf_server.address is not None
    payload, method, contrast = FIRE_TEXTS[case]
    # FIRE sends NUL-terminated strings and OpenRecon always names its config "openrecon".
    images, texts = _client(
        shepp_full, zf_server.address, config=ConfigFile("openrecon"), text=json.dumps(payload) + "\0"
    )
    assert texts == [] and len(images) == 1
    assert images[0].meta["ReconMethod"] == method
    assert images[0].meta["ImageProcessingHistory"] == ["RECON-SERVER", method.upper()]
    if contrast:
        assert images[0].meta["Contrast"] == contrast


def test_fire_config_naming_no_method_is_a_warning(
    zf_server: StreamServer, shepp_full: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert zf_server.address is not None
    text = json.dumps({"parameters": {"config": "invertcontrast", "options": "complex"}})
    with caplog.at_level(logging.WARNING, logger="recon_server.service.server"):
        images, texts = _client(shepp_full, zf_server.address, config=ConfigFile("openrecon"), text=text)
    assert texts == [] and images[0].meta["ReconMethod"] == "zero-filled"
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'invertcontrast'" in m and "using zero-filled instead" in m for m in messages), messages


GADGETRON_XML = {
    "attributes": '<property name="method" value="cg-sense"/><property name="contrast" value="T2"/>',
    "child elements": (
        "<property><name>method</name><value>cg-sense</value></property>"
        "<property><name>contrast</name><value>T2</value></property>"
    ),
}


@pytest.mark.parametrize("form", list(GADGETRON_XML))
def test_config_text_with_gadgetron_properties(zf_server: StreamServer, shepp_full: Path, form: str) -> None:
    assert zf_server.address is not None
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><gadgetronStreamConfiguration>'
        f"<external><configuration>{GADGETRON_XML[form]}</configuration></external>"
        "</gadgetronStreamConfiguration>"
    )
    images, texts = _client(shepp_full, zf_server.address, config=ConfigText(xml))
    assert texts == [] and len(images) == 1
    assert images[0].meta["ReconMethod"] == "cg-sense" and images[0].meta["Contrast"] == "T2"


# --------------------------------------------------------------------------- early ERR


def _read_replies(sock: socket.socket) -> list[object]:
    return list(ProtocolDeserializer(sock.makefile("rb")).deserialize())


def _encode(*items: object) -> bytes:
    import io

    buf = io.BytesIO()
    ser = ProtocolSerializer(buf)
    for item in items:
        ser.serialize(item)

    return buf.getvalue()


def _early_err_server(tmp_path: Path) -> StreamServer:
    srv = StreamServer(
        ServiceConfig(
            port=0, default_method="zero-filled", failed_scans_dir=tmp_path / "failed", socket_timeout_s=30
        )
    )
    srv.start()
    return srv


def test_unknown_method_in_config_text_is_answered_before_the_header(tmp_path: Path) -> None:
    srv = _early_err_server(tmp_path)
    try:
        assert srv.address is not None
        xml = '<configuration><property name="method" value="nope"/></configuration>'
        with socket.create_connection(srv.address, timeout=10) as sock:
            sock.sendall(_encode(ConfigText(xml)))  # and nothing else: no header, no CLOSE
            replies = _read_replies(sock)
    finally:
        srv.stop()
    assert len(replies) == 1 and isinstance(replies[0], str)
    assert replies[0].startswith("ERR ValueError: unknown reconstruction method 'nope'")
    assert not (tmp_path / "failed").exists()


def test_unknown_method_in_json_text_is_answered_before_the_readouts(
    shepp_full: Path, tmp_path: Path
) -> None:
    header, acqs = _read_file(shepp_full)
    srv = _early_err_server(tmp_path)
    try:
        assert srv.address is not None
        with socket.create_connection(srv.address, timeout=10) as sock:
            text = json.dumps({"parameters": {"config": "openrecon", "method": "nope"}})
            sock.sendall(_encode(ConfigFile("openrecon"), header, text))
            # The client has sent only the configuration and the header: the answer comes now
            # (the socket time-out would fail the test if the server waited for the readouts).
            replies = _read_replies(sock)  # ERR, then CLOSE
            try:  # the client may still upload its scan: the server drops it (bounded drain)
                sock.sendall(_encode(*acqs))
            except OSError:
                pass
    finally:
        srv.stop()
    assert len(replies) == 1 and isinstance(replies[0], str)
    assert replies[0].startswith("ERR ValueError: unknown reconstruction method 'nope'")
    assert not (tmp_path / "failed").exists()  # a refused configuration is not a failed scan


def test_samples_out_of_range_is_answered_early(zf_server: StreamServer, shepp_full: Path) -> None:
    header, _ = _read_file(shepp_full)
    assert zf_server.address is not None
    with socket.create_connection(zf_server.address, timeout=10) as sock:
        sock.sendall(_encode(header, json.dumps({"samples": 1000})))
        replies = _read_replies(sock)
    assert len(replies) == 1 and "samples must be an integer in 1..32" in str(replies[0])


# ------------------------------------------------------------------ image header fields


def test_images_carry_measurement_uid_time_stamps_and_table_position(
    zf_server: StreamServer, shepp_full: Path, tmp_path: Path
) -> None:
    header, acqs = _read_file(shepp_full)
    path = tmp_path / "stamped.h5"
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=True) as dset:
        dset.write_xml_header(header.toXML("utf-8"))
        for i, acq in enumerate(acqs):
            acq.measurement_uid = 4242
            acq.acquisition_time_stamp = 100000 + 7 * i
            acq.physiology_time_stamp[:] = (11 + i, 22 + i, 33 + i)
            acq.patient_table_position[:] = (1.5, -2.5, 120.25)
            acq.position[:] = (3.0, -4.0, 5.5)
            acq.read_dir[:], acq.phase_dir[:], acq.slice_dir[:] = (0, 1, 0), (-1, 0, 0), (0, 0, 1)
            dset.append_acquisition(acq)
    first = next(i for i, a in enumerate(acqs) if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT))
    assert zf_server.address is not None
    images, texts = _client(path, zf_server.address)
    assert texts == [] and len(images) == 1
    img = images[0]
    assert img.measurement_uid == 4242
    assert img.acquisition_time_stamp == 100000 + 7 * first
    assert tuple(img.physiology_time_stamp) == (11 + first, 22 + first, 33 + first)
    np.testing.assert_allclose(img.patient_table_position, (1.5, -2.5, 120.25))
    np.testing.assert_allclose(img.position, (3.0, -4.0, 5.5), atol=1e-5)
    np.testing.assert_allclose(img.read_dir, (0, 1, 0), atol=1e-6)
    np.testing.assert_allclose(img.phase_dir, (-1, 0, 0), atol=1e-6)
    np.testing.assert_allclose(img.slice_dir, (0, 0, 1), atol=1e-6)


def test_fallback_meta_survives_the_wire_codec() -> None:
    """Meta with the fallback note round-trips through ismrmrd's own parser (quotes, ->, :)."""
    from recon_server.scan import ImageVolume, Provenance, SliceGeometry
    from recon_server.service.stream import volume_to_images

    geom = SliceGeometry((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (200, 200, 5), table_position=(1, 2, 3))
    volume = ImageVolume(
        magnitude=np.ones((1, 4, 4), np.float32),
        geometry=[geom],
        header_xml="",
        provenance=Provenance(
            "cg-sense", {"fallback_from": "dps", "fallback_reason": "error: ValueError: x <y> & 'z'"}
        ),
        series_description="FLAIR (fallback: cg-sense)",
        window_center=1,
        window_width=1,
        measurement_uid=7,
    )
    (image,) = volume_to_images(volume)
    meta = ismrmrd.Meta.deserialize(image.meta_xml)
    assert meta["Fallback"] == "dps -> cg-sense: error: ValueError: x <y> & 'z'"
    assert image.head["measurement_uid"] == 7
    assert tuple(image.head["patient_table_position"]) == (1, 2, 3)


def test_gadgetron_listener_falls_back_too(
    shepp_full: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gadget shares the pipeline's fallback: images, not ERROR (8), when the model is missing."""
    monkeypatch.setenv(methods.MODEL_DIR_ENV, str(tmp_path / "no-model"))
    listener = GadgetronListener(ServiceConfig(gadgetron_port=0, default_method="zero-filled"))
    address = listener.start()
    config = b'<configuration><property name="method" value="dps-fast"/></configuration>'
    with ismrmrd.Dataset(str(shepp_full), "dataset", create_if_needed=False) as dset:
        header = bytes(dset.read_xml_header())
        acqs = [dset.read_acquisition(i) for i in range(dset.number_of_acquisitions())]
    try:
        with socket.create_connection(address, timeout=60) as sock:
            sock.sendall(struct.pack("<HI", 2, len(config)) + config)
            sock.sendall(struct.pack("<HI", 3, len(header)) + header)
            for acq in acqs:
                sock.sendall(struct.pack("<H", 1008) + acq.to_bytes())
            sock.sendall(struct.pack("<H", 4))
            images, errors, closed = read_gadgetron_replies(sock)
    finally:
        listener.stop()
        listener.worker.close()
    assert errors == [] and closed and len(images) == 1
    assert images[0].meta["ReconMethod"] == "cg-sense"
    assert images[0].meta["Fallback"].startswith("dps-fast -> cg-sense: model-missing: ")
