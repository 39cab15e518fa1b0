"""Prometheus exposition, the health endpoint, and measurement ids on log lines."""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from recon_server.ops import logs
from recon_server.ops import service_metrics as metrics
from recon_server.ops.http import OpsServer, spool_writable
from recon_server.ops.service_metrics import Registry, Sample, SampleCollector, parse_exposition


def test_exposition_format_counters_gauges_histograms_collectors() -> None:
    reg = Registry()
    c = Counter("t_scans_total", "Scans.", ("listener",), registry=reg)
    g = Gauge("t_queue", "Queue.", registry=reg)
    h = Histogram("t_seconds", "Stage time.", ("stage",), buckets=(0.1, 1.0), registry=reg)
    c.labels(listener="mrd").inc()
    c.labels(listener='we"ird').inc(2)
    g.inc(3)
    g.dec()
    for v in (0.05, 0.5, 5.0):
        h.labels(stage="recon").observe(v)
    spool = [Sample("t_spool", {"destination": "pacs"}, 4), Sample("t_unknown", {}, 1)]
    reg.add_collector("x", SampleCollector({"t_spool": "Spool."}, lambda: spool))
    text = reg.render()
    assert "# TYPE t_scans_total counter" in text and "# TYPE t_seconds histogram" in text
    assert "# HELP t_spool Spool." in text and "# TYPE t_spool gauge" in text
    assert "_created" not in text and "t_unknown" not in text
    v = parse_exposition(text)
    assert v['t_scans_total{listener="mrd"}'] == 1
    assert v['t_scans_total{listener="we\\"ird"}'] == 2
    assert v["t_queue"] == 2
    assert v['t_seconds_bucket{le="0.1",stage="recon"}'] == 1
    assert v['t_seconds_bucket{le="1.0",stage="recon"}'] == 2
    assert v['t_seconds_bucket{le="+Inf",stage="recon"}'] == 3
    assert v['t_seconds_count{stage="recon"}'] == 3
    assert v['t_seconds_sum{stage="recon"}'] == pytest.approx(5.55)
    assert v['t_spool{destination="pacs"}'] == 4
    assert reg.value("t_scans_total", listener="mrd") == 1 and reg.value("t_scans_total", listener="x") == 0
    # Re-adding a collector under the same key replaces it (no duplicate-series error).
    reg.add_collector("x", SampleCollector({"t_spool": "Spool."}, lambda: [Sample("t_spool", {}, 7)]))
    assert parse_exposition(reg.render())["t_spool"] == 7
    reg.remove_collector("x")
    assert "t_spool" not in reg.render()
    with pytest.raises(ValueError):
        c.labels(listener="mrd").inc(-1)
    with pytest.raises(ValueError):
        c.labels(wrong="x")


def test_service_exposition_parses_with_prometheus_client() -> None:
    """The service registry's text parses as standard exposition and keeps the dashboards' names."""
    metrics.scans_received("mrd", scans=1, readouts=4, nbytes=100, seconds=0.2)
    metrics.stream_done("mrd", images=2, send_seconds=0.01)
    metrics.stream_failed("mrd", ValueError("x"))
    metrics.fallback_used("dps-fast", "cg-sense", "model-missing")
    metrics.job_cancelled("dps-fast", "shutdown")
    with metrics.in_service("mrd", 1):
        pass
    text = metrics.REGISTRY.render()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # The parser drops a counter's _total from the family name; the samples keep it.
    expected = {
        "recon_server_streams": "counter",
        "recon_server_scans": "counter",
        "recon_server_errors": "counter",
        "recon_server_readouts": "counter",
        "recon_server_received_bytes": "counter",
        "recon_server_images_sent": "counter",
        "recon_server_fallbacks": "counter",
        "recon_server_jobs_cancelled": "counter",
        "recon_server_queue_length": "gauge",
        "recon_server_queue_waiting_scans": "gauge",
        "recon_server_info": "gauge",
        "recon_server_stage_seconds": "histogram",
        "recon_server_queue_wait_seconds": "histogram",
    }
    assert {name: families[name].type for name in expected} == expected
    for name, kind in expected.items():
        if kind == "counter":  # exposed under the same ..._total name as before prometheus_client
            assert f"# TYPE {name}_total counter" in text
    samples = {s.name for f in families.values() for s in f.samples}
    assert {"recon_server_streams_total", "recon_server_stage_seconds_bucket"} <= samples
    assert not any(name.endswith("_created") for name in samples)
    buckets = {
        s.labels["le"]
        for s in families["recon_server_stage_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["stage"] == "receive"
    }
    assert sorted(float(b) for b in buckets) == [*metrics.STAGE_BUCKETS, float("inf")]
    assert metrics.REGISTRY.value("recon_server_streams_total", listener="mrd", outcome="ok") >= 1


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_ready_metrics_and_not_found(tmp_path: Path) -> None:
    ready = threading.Event()
    reg = Registry()
    Counter("t_up_total", "Up.", registry=reg).inc()
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
