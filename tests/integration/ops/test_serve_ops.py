"""The running service: health, readiness, metrics moving during a replay, ids on log lines."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from recon_server.mrd.replay import replay_file
from recon_server.ops.service_metrics import parse_exposition

from .conftest import MEASUREMENT_ID


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _metrics(base: str) -> dict[str, float]:
    status, text = _get(base + "/metrics")
    assert status == 200
    return parse_exposition(text)


def test_health_metrics_and_logs_during_replay(served, raw_with_id: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert _get(served.http + "/healthz") == (200, "ok\n")
    status, body = _get(served.http + "/readyz")
    ready = json.loads(body)
    assert status == 200, body
    assert set(ready["checks"]) == {
        "recon_worker",
        "recon_queue",
        "accepting",
        "model",
        "dicom_output",
        "dicom_spool",
    }

    before = _metrics(served.http)
    key_scans = 'recon_server_scans_total{listener="mrd"}'
    key_recon = 'recon_server_stage_seconds_count{stage="reconstruct"}'
    result = replay_file(
        raw_with_id, host=served.mrd[0], port=served.mrd[1], out_dir=tmp_path / "out", progress=False
    )
    assert len(result.images) > 0
    after = _metrics(served.http)
    # One scan per (contrast, repetition): as many as image series came back.
    n_scans = len({int(im.head["image_series_index"]) for im in result.images})

    assert after[key_scans] == before.get(key_scans, 0) + n_scans
    assert after['recon_server_streams_total{listener="mrd",outcome="ok"}'] >= 1
    assert after['recon_server_images_sent_total{listener="mrd"}'] - before.get(
        'recon_server_images_sent_total{listener="mrd"}', 0
    ) == len(result.images)
    assert after[key_recon] == before.get(key_recon, 0) + n_scans
    for stage in ("receive", "service", "send", "output:dicom", "coils", "method"):
        assert after[f'recon_server_stage_seconds_count{{stage="{stage}"}}'] >= 1, stage
    assert after['recon_server_stage_seconds_sum{stage="reconstruct"}'] > 0
    assert after["recon_server_queue_length"] == 0
    assert after['recon_server_received_bytes_total{listener="mrd"}'] > 10_000

    # A bad stream moves the error counter.
    import socket

    with socket.create_connection(served.mrd, timeout=30) as sock:
        sock.sendall(b"\xff\xff" + b"\0" * 64)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass
    errors = _metrics(served.http)
    assert errors['recon_server_streams_total{listener="mrd",outcome="error"}'] >= 1
    assert any(
        k.startswith("recon_server_errors_total{error=") and k.endswith(',where="mrd"}') for k in errors
    ), errors

    # JSON log lines: every line of the scan's connection after its header names the measurement.
    lines = [json.loads(line) for line in served.log_path.read_text().splitlines() if line.startswith("{")]
    assert lines, "no JSON log lines"
    stream_lines = [
        d for d in lines if d["logger"] == "recon_server.service.stream" and "readouts" in d["message"]
    ]
    assert stream_lines and all(d["measurement_id"] == MEASUREMENT_ID for d in stream_lines)
    assert all(d["peer"] != "-" for d in stream_lines)
    failed = [d for d in lines if "failed" in d["message"] and d["logger"] == "recon_server.service.stream"]
    assert failed and failed[-1]["measurement_id"] == "-"  # the bad stream never sent a header
