"""store_series + Spool.reconcile: after a crash at any point of writing and spooling a series,
a restart spools every image of it (once per SOPInstanceUID) or leaves it to the journal."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from recon_server.dicom import deliver
from recon_server.dicom.config import DicomConfig, PacsDestination
from recon_server.dicom.spool import DELIVERY_TAG, Spool


@pytest.fixture
def config(tmp_path: Path) -> DicomConfig:
    with socket.socket() as sock:  # a port nobody listens on: nothing is sent
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dest = PacsDestination(name="pacs", host="127.0.0.1", port=port, called_ae="PACS")
    return DicomConfig(
        output_dir=tmp_path / "out",
        spool_dir=tmp_path / "spool",
        destinations=(dest,),
        allow_missing_identifiers=True,
    )


class Crash(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def _crash_after(monkeypatch: pytest.MonkeyPatch, target: object, name: str, calls: int) -> None:
    real = getattr(target, name)
    count = {"n": 0}

    def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
        if count["n"] == calls:
            raise Crash
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapped)


def _pending(config: DicomConfig) -> list[str]:
    return sorted(item.sop_uid for b in Spool(config.spool_dir).pending("pacs") for item in b.items)


def test_crash_while_spooling_is_finished_by_reconcile(vol, config: DicomConfig, monkeypatch) -> None:
    volume = vol.make_volume(n_slices=4)
    with monkeypatch.context() as m:
        _crash_after(m, Spool, "enqueue", 2)  # 2 of 4 images spooled, then the process dies
        token = DELIVERY_TAG.set("entry1/image-1")
        with pytest.raises(Crash):
            deliver.store_series(volume, config)
        DELIVERY_TAG.reset(token)
    assert len(_pending(config)) == 2
    report = Spool(config.spool_dir).reconcile()
    assert (report.respooled, report.images, report.dropped) == (1, 4, 0)
    assert report.delivered_tags == {"entry1/image-1"}
    files = sorted(config.output_dir.glob("*/IM*.dcm"))
    assert len(files) == 4 and len(_pending(config)) == 4
    assert Spool(config.spool_dir).reconcile().images == 0  # idempotent: the marker says spooled
    assert Spool(config.spool_dir).release("entry1") == 1
    assert Spool(config.spool_dir).reconcile().delivered_tags == set()


def test_crash_while_writing_files_leaves_the_series_to_the_journal(vol, config, monkeypatch) -> None:
    volume = vol.make_volume(n_slices=4)
    with monkeypatch.context() as m:
        _crash_after(m, deliver, "write_atomic", 3)
        with pytest.raises(Crash):
            deliver.store_series(volume, config)
    report = Spool(config.spool_dir).reconcile()
    assert (report.respooled, report.dropped) == (0, 1) and _pending(config) == []
    paths = deliver.store_series(volume, config)  # the journal's reconstruction, later
    assert len(paths) == 4 and len(_pending(config)) == 4
    assert not list((config.spool_dir / "series").glob("*.json"))  # no journal tag: marker gone


def test_drain_and_stop_is_bounded_and_keeps_what_is_left(vol, config: DicomConfig) -> None:
    deliver.store_series(vol.make_volume(n_slices=2), config)  # the PACS port is closed
    worker = deliver.SenderWorker(config).start()
    t0 = time.monotonic()
    assert worker.drain_and_stop(0.5) == 2
    assert time.monotonic() - t0 < 5 and not worker.alive
    assert len(_pending(config)) == 2  # sent after the restart
