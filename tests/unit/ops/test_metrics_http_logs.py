"""Prometheus exposition, the health endpoint, and measurement ids on log lines."""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from recon_server.ops import logs
from recon_server.ops.http import OpsServer, spool_writable
from recon_server.ops.service_metrics import Registry, Sample, parse_exposition


def test_exposition_format_counters_gauges_histograms_collectors() -> None:
    reg = Registry()
    c = reg.counter("t_scans_total", "Scans.", ("listener",))
    g = reg.gauge("t_queue", "Queue.")
    h = reg.histogram("t_seconds", "Stage time.", ("stage",), buckets=(0.1, 1.0))
    c.inc(listener="mrd")
    c.inc(2, listener='we"ird')
    g.inc(3)
    g.dec()
    for v in (0.05, 0.5, 5.0):
        h.observe(v, stage="recon")
    reg.add_collector("x", {"t_spool": "Spool."}, lambda: [Sample("t_spool", {"destination": "pacs"}, 4)])
    text = reg.render()
    assert "# TYPE t_scans_total counter" in text and "# TYPE t_seconds histogram" in text
    assert "# HELP t_spool Spool." in text and "# TYPE t_spool gauge" in text
    v = parse_exposition(text)
    assert v['t_scans_total{listener="mrd"}'] == 1
    assert v['t_scans_total{listener="we\\"ird"}'] == 2
    assert v["t_queue"] == 2
    assert v['t_seconds_bucket{stage="recon",le="0.1"}'] == 1
    assert v['t_seconds_bucket{stage="recon",le="1"}'] == 2
    assert v['t_seconds_bucket{stage="recon",le="+Inf"}'] == 3
    assert v['t_seconds_count{stage="recon"}'] == 3
    assert v['t_seconds_sum{stage="recon"}'] == pytest.approx(5.55)
    assert v['t_spool{destination="pacs"}'] == 4
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1, listener="mrd")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(wrong="x")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_ready_metrics_and_not_found(tmp_path: Path) -> None:
    ready = threading.Event()
    reg = Registry()
    reg.counter("t_up_total", "Up.").inc()
    spool = tmp_path / "spool"
    srv = OpsServer(
        "127.0.0.1",
        0,
        checks={"model": lambda: (ready.is_set(), "loading"), "spool": spool_writable(spool)},
        registry=reg,
    )
    host, port = srv.start()
    try:
        base = f"http://{host}:{port}"
        assert _get(base + "/healthz") == (200, "ok\n")
        status, body = _get(base + "/readyz")
        doc = json.loads(body)
        assert status == 503 and doc["ready"] is False
        assert doc["checks"]["model"] == {"ok": False, "detail": "loading"}
        assert doc["checks"]["spool"]["ok"] is True and spool.is_dir()
        ready.set()
        assert _get(base + "/readyz")[0] == 200
        spool.chmod(0o500)  # read-only folder: not ready (root ignores modes, so check the effect)
        probe_ok = spool_writable(spool)()[0]
        assert (_get(base + "/readyz")[0] == 200) == probe_ok
        spool.chmod(0o700)
        status, text = _get(base + "/metrics")
        assert status == 200 and parse_exposition(text)["t_up_total"] == 1
        assert _get(base + "/nope")[0] == 404
        req = urllib.request.Request(base + "/metrics", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 405
    finally:
        srv.stop()


def test_measurement_id_on_every_record_per_thread() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger("recon_server.test_ops_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def connection(mid: str) -> None:
        with logs.connection_context(("10.0.0.5", 4711)):
            logger.info("before header")
            logs.set_measurement(mid)
            logger.info("after header")

    threads = [threading.Thread(target=connection, args=(f"MID_{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logger.info("outside")
    logger.removeHandler(handler)
    after = sorted(r.measurement_id for r in records if r.getMessage() == "after header")  # type: ignore[attr-defined]
    assert after == ["MID_0", "MID_1", "MID_2"]
    assert {r.measurement_id for r in records if r.getMessage() == "before header"} == {"-"}  # type: ignore[attr-defined]
    assert {r.peer for r in records if r.getMessage() != "outside"} == {"10.0.0.5:4711"}  # type: ignore[attr-defined]
    outside = records[-1]
    assert outside.measurement_id == "-" and outside.peer == "-"  # type: ignore[attr-defined]
    after_header = next(r for r in records if r.getMessage() == "after header")
    line = json.loads(logs.JsonFormatter().format(after_header))
    assert line["measurement_id"].startswith("MID_") and line["level"] == "INFO"
    assert set(line) >= {"time", "level", "logger", "message", "measurement_id", "peer", "thread"}
