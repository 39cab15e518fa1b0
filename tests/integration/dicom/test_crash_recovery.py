"""Issue 14: SIGKILL of `recon-server serve` at points of several scans (receiving, reconstructing,
writing DICOM, spooling, sending), restart, and every image of every scan at a real Orthanc
exactly once; SIGTERM during a reconstruction: ERR + CLOSE to the client, the raw data kept in
the journal, exit 0 without `terminate called ...`."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from recon_server.data import acquire
from recon_server.mrd import ismrmrd_io, wire
from recon_server.service.stream import PROGRESS_PREFIX

SLICES = 6
PHASES = ("receiving", "reconstructing", "writing", "spooling", "delivered")


MODEL_DIR = Path(__file__).resolve().parents[3] / "models" / "flair-stroke-demo"


def _config(tmp_path: Path, pacs_port: int, *, method: str = "cg-sense") -> Path:
    path = tmp_path / "recon-server.toml"
    path.write_text(
        f"""
[server]
port = 0
journal_dir = "{tmp_path / "journal"}"
failed_scans_dir = "{tmp_path / "failed"}"
shutdown_grace_s = 1.0
shutdown_drain_s = 2.0

[recon]
default_method = "{method}"
model_dir = "{MODEL_DIR}"

[dicom]
output_dir = "{tmp_path / "dicom"}"
spool_dir = "{tmp_path / "spool"}"
poll_interval_s = 0.2

[dicom.retry]
initial_s = 0.2
max_s = 1.0

[[dicom.destinations]]
name = "pacs"
host = "127.0.0.1"
port = {pacs_port}
called_ae = "TESTPACS"
calling_ae = "RECONSRV"
"""
    )
    return path


class Serve:
    """One `recon-server serve` child; its log in ``log``."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        cmd = [sys.executable, "-m", "recon_server.cli", "serve", "--config", str(config), "--no-http"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("a"), text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "MRD stream server on" in line:
                self.port = int(line.rsplit(":", 1)[1])
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return
        self.proc.wait()
        raise AssertionError(f"serve exited with {self.proc.returncode}: {log.read_text()[-2000:]}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Client(threading.Thread):
    """Streams one raw file (pausing every 16 readouts when ``slow``) and reads the replies."""

    def __init__(self, raw: ismrmrd_io.RawScan, port: int, *, slow: bool = False) -> None:
        super().__init__(daemon=True)
        self.raw, self.port, self.slow = raw, port, slow
        self.images: list[wire.Image] = []
        self.texts: list[str] = []
        self.closed = False

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=120) as sock:
                writer = wire.WireWriter(sock.makefile("wb"))
                writer.send(wire.ConfigFile("default"), flush=False)
                writer.send(wire.Header(self.raw.header_xml), flush=False)
                empty = np.zeros((0, 0), dtype=np.float32)
                for i, (head, data) in enumerate(
                    zip(self.raw.acquisition_headers, self.raw.data, strict=True)
                ):
                    writer.send(wire.Acquisition(head, data, empty), flush=self.slow and i % 16 == 15)
                    if self.slow and i % 16 == 15:
                        time.sleep(0.02)
                writer.send(wire.Close())
                reader = wire.WireReader(sock.makefile("rb"))
                while True:
                    msg = reader.read_message()
                    if isinstance(msg, wire.Close):
                        self.closed = True
                        return
                    if isinstance(msg, wire.Image):
                        self.images.append(msg)
                    elif isinstance(msg, wire.Text) and not msg.text.startswith(PROGRESS_PREFIX):
                        self.texts.append(msg.text)
        except (OSError, ValueError):
            return  # the server was killed


def _phase(tmp_path: Path) -> str | None:
    """Where the server is with the scan in flight, from what is on disk."""
    journal = tmp_path / "journal"
    states = []
    for path in journal.glob("*.json"):
        try:
            states.append(json.loads(path.read_text())["state"])
        except (OSError, ValueError, KeyError):
            continue
    markers = []
    for path in (tmp_path / "spool" / "series").glob("*.json"):
        try:
            markers.append(json.loads(path.read_text())["state"])
        except (OSError, ValueError, KeyError):
            continue
    if "receiving" in states:
        return "receiving"
    if "writing" in markers:
        return "writing"
    if list((tmp_path / "spool" / "pacs" / "pending").glob("*/*.dcm")):
        return "spooling"
    if "received" in states:
        return "reconstructing"
    return None


def _settled(tmp_path: Path) -> bool:
    journal_left = list((tmp_path / "journal").glob("*.json"))
    pending = list((tmp_path / "spool" / "pacs" / "pending").glob("*/*.dcm"))
    return not journal_left and not pending


def _wait(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> list[ismrmrd_io.RawScan]:
    out = []
    folder = tmp_path_factory.mktemp("subjects")
    for i in range(len(PHASES)):
        config = acquire.SimulationConfig(
            contrast="FLAIR", matrix=64, slices=SLICES, coils=4, acceleration=2, center_fraction=0.25
        )
        files = acquire.write_subject(
            acquire.simulate_subject(config, seed=40 + i, index=i), folder / f"s{i}"
        )
        out.append(ismrmrd_io.read_raw(files["raw"]))
    return out


def test_sigkill_at_any_point_then_restart_delivers_every_image_once(
    orthanc, scans: list[ismrmrd_io.RawScan], tmp_path: Path
) -> None:
    rng = random.Random(14)
    config = _config(tmp_path, orthanc.dicom_port)
    log = tmp_path / "serve.log"
    server = Serve(config, log)
    hit: list[str] = []
    try:
        for raw, target in zip(scans, PHASES, strict=True):
            client = Client(raw, server.port, slow=target == "receiving")
            client.start()
            if target == "delivered":
                client.join(60)
                assert client.closed and len(client.images) == SLICES, client.texts
                _wait(lambda: _settled(tmp_path), 30, "the spool to drain")
                seen = "delivered"
            else:
                seen = None
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and client.is_alive():
                    phase = _phase(tmp_path)
                    if phase == target or (phase is not None and PHASES.index(phase) > PHASES.index(target)):
                        seen = phase
                        break
                    time.sleep(0.001)
                time.sleep(rng.uniform(0, 0.005))  # a random point within the phase
            server.kill()
            client.join(30)
            hit.append(seen or "after")
            if seen == "reconstructing":
                # The raw data survived the SIGKILL, complete and replayable.
                (entry,) = (tmp_path / "journal").glob("*.h5")
                assert len(ismrmrd_io.read_raw(entry)) == len(raw)
            failed_before = set((tmp_path / "failed").glob("*.h5"))
            server = Serve(config, log)
            _wait(lambda: _settled(tmp_path), 60, "journal recovery and the spool after the restart")
            if set((tmp_path / "failed").glob("*.h5")) - failed_before:
                # Killed while receiving: the client was cut off and sends the scan again.
                again = Client(raw, server.port)
                again.start()
                again.join(60)
                assert again.closed and len(again.images) == SLICES, again.texts
                _wait(lambda: _settled(tmp_path), 30, "the spool to drain")
    finally:
        server.kill()
    print("SIGKILL while:", hit)
    assert "receiving" in hit and "reconstructing" in hit, hit
    tags = [orthanc.get(f"/instances/{i}/simplified-tags") for i in orthanc.instances()]
    per_series = Counter(t["SeriesInstanceUID"] for t in tags)
    per_study = Counter(t["StudyInstanceUID"] for t in tags)
    sops = Counter(t["SOPInstanceUID"] for t in tags)
    assert len(per_study) == len(scans), (hit, per_study)
    assert sorted(per_series.values()) == [SLICES] * len(scans), (hit, per_series)
    assert max(sops.values()) == 1 and len(sops) == SLICES * len(scans)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_sigterm_during_reconstruction_sends_err_and_keeps_the_raw_data(
    orthanc, scans: list[ismrmrd_io.RawScan], tmp_path: Path
) -> None:
    config = _config(tmp_path, orthanc.dicom_port, method="dps")  # minutes on a CPU: still running
    log = tmp_path / "serve.log"
    server = Serve(config, log)
    client = Client(scans[0], server.port)
    client.start()
    _wait(lambda: _phase(tmp_path) == "reconstructing", 30, "the reconstruction to start")
    time.sleep(0.5)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    client.join(10)
    assert time.monotonic() - t0 < 20
    assert client.closed and client.images == [], client.texts
    assert len(client.texts) == 1 and client.texts[0].startswith("ERR server shutting down"), client.texts
    text = log.read_text()
    assert "terminate called" not in text and "Traceback" not in text, text[-3000:]
    (entry,) = (tmp_path / "journal").glob("*.h5")
    assert json.loads(entry.with_suffix(".json").read_text())["state"] == "received"
    assert len(ismrmrd_io.read_raw(entry)) == len(scans[0])
