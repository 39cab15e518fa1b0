"""Issue 14, fair and bounded reconstruction over real sockets: methods a client may ask for,
the per-method time limit (fallback images, or ERR without a fallback), the journal of the
stream server (kept until delivered; a failing scan moved to the failed-scans folder under a
unique name)."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
from ismrmrd.serialization import ConfigFile, ProtocolDeserializer, ProtocolSerializer

from recon_server.mrd import ismrmrd_io
from recon_server.service.config import ServiceConfig
from recon_server.service.server import StreamServer
from recon_server.service.stream import PROGRESS_PREFIX

FLAIR = json.dumps({"contrast": "FLAIR"})  # the diffusion methods need a contrast label


def _read_file(path: Path) -> tuple[ismrmrd.xsd.ismrmrdHeader, list[ismrmrd.Acquisition]]:
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as dset:
        header = ismrmrd.xsd.CreateFromDocument(dset.read_xml_header())
        acqs = [dset.read_acquisition(i) for i in range(dset.number_of_acquisitions())]
    return header, acqs


def _encode(*items: object) -> bytes:
    buf = io.BytesIO()
    ser = ProtocolSerializer(buf)
    for item in items:
        ser.serialize(item)
    return buf.getvalue()


def _scan(path: Path, address: tuple[str, int], *, text: str | None = None) -> tuple[list, list[str]]:
    header, acqs = _read_file(path)
    with socket.create_connection(address, timeout=120) as sock:
        items: list[object] = [ConfigFile("default"), header]
        if text is not None:
            items.append(text)
        sock.sendall(_encode(*items, *acqs) + b"\x04\x00")  # ... CLOSE
        replies = list(ProtocolDeserializer(sock.makefile("rb")).deserialize())
    images = [r for r in replies if isinstance(r, ismrmrd.Image)]
    return images, [r for r in replies if isinstance(r, str) and not r.startswith(PROGRESS_PREFIX)]


@pytest.fixture
def started() -> Iterator:
    servers: list[StreamServer] = []

    def start(config: ServiceConfig) -> StreamServer:
        srv = StreamServer(config)
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def test_client_asking_for_dps_is_refused_before_the_readouts(
    started, shepp_full: Path, tmp_path: Path
) -> None:
    srv = started(ServiceConfig(port=0, default_method="zero-filled", journal_dir=tmp_path / "journal"))
    header, _ = _read_file(shepp_full)
    with socket.create_connection(srv.address, timeout=10) as sock:
        # Only the configuration and the header: the answer must come before any readout.
        sock.sendall(_encode(ConfigFile("default"), header, json.dumps({"method": "dps"})))
        replies = list(ProtocolDeserializer(sock.makefile("rb")).deserialize())
    assert len(replies) == 1 and isinstance(replies[0], str), replies
    assert replies[0].startswith("ERR ValueError: method 'dps' may not be requested by a client"), replies
    assert "allowed_client_methods" in replies[0]
    assert not list((tmp_path / "journal").rglob("*.h5"))  # refused: not a scan, nothing kept


def test_allowed_client_methods_come_from_the_configuration(started, shepp_full: Path) -> None:
    config = ServiceConfig(port=0, default_method="zero-filled", allowed_client_methods=("zero-filled",))
    srv = started(config)
    images, texts = _scan(shepp_full, srv.address, text=json.dumps({"method": "zero-filled"}))
    assert texts == [] and len(images) == 1
    _, texts = _scan(shepp_full, srv.address, text=json.dumps({"method": "cg-sense"}))
    assert len(texts) == 1 and "may not be requested" in texts[0]


def test_time_limit_exceeded_gives_fallback_images(started, shepp_full: Path) -> None:
    srv = started(ServiceConfig(port=0, default_method="dps", time_limits={"dps": 0.5}, socket_timeout_s=120))
    images, texts = _scan(shepp_full, srv.address, text=FLAIR)
    assert texts == [] and len(images) == 1, texts
    meta = ismrmrd.Meta.deserialize(images[0].attribute_string)
    assert meta["ReconMethod"] == "cg-sense"
    assert meta["Fallback"].startswith("dps -> cg-sense: time-limit: TimeLimitExceeded: dps stopped after")


def test_time_limit_without_fallback_is_an_err(started, shepp_full: Path, tmp_path: Path) -> None:
    srv = started(
        ServiceConfig(
            port=0,
            default_method="dps",
            fallback_method="none",
            time_limits={"dps": 0.5},
            journal_dir=tmp_path / "journal",
            failed_scans_dir=tmp_path / "failed",
            socket_timeout_s=120,
        )
    )
    images, texts = _scan(shepp_full, srv.address, text=FLAIR)
    assert images == [] and len(texts) == 1 and texts[0].startswith("ERR TimeLimitExceeded: dps stopped"), (
        texts
    )
    (kept,) = (tmp_path / "failed").glob("*.h5")  # the raw data moved from the journal, replayable
    assert kept.name in texts[0]
    assert len(ismrmrd_io.read_raw(kept)) == len(ismrmrd_io.read_raw(shepp_full))
    reason = json.loads(kept.with_suffix(".reason.json").read_text())
    assert reason["reason"].startswith("TimeLimitExceeded")
    assert not list((tmp_path / "journal").glob("*.json"))


def test_journal_is_empty_after_delivery_and_failed_names_never_collide(
    started, shepp_full: Path, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    ok = started(ServiceConfig(port=0, default_method="zero-filled", journal_dir=journal))
    images, texts = _scan(shepp_full, ok.address)
    assert texts == [] and len(images) == 1
    assert not list(journal.glob("*.h5")) and not list(journal.glob("*.json"))
    failing = started(
        ServiceConfig(
            port=0,
            default_method="dps",
            fallback_method="none",
            time_limits={"dps": 0.01},
            journal_dir=journal,
            failed_scans_dir=tmp_path / "failed",
        )
    )
    for _ in range(3):  # the same scan (same measurement id) failing three times within a second
        _, texts = _scan(shepp_full, failing.address, text=FLAIR)
        assert texts and texts[0].startswith("ERR "), texts
    kept = sorted((tmp_path / "failed").glob("*.h5"))
    assert len(kept) == 3 and len({p.name for p in kept}) == 3
    raw = [ismrmrd_io.read_raw(p) for p in kept]
    assert all(np.array_equal(r.data[0], raw[0].data[0]) for r in raw)
