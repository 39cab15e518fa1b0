"""The reconstruction worker: /readyz false while the queue is over its threshold or the worker is
stuck, the queue wait in the metrics, cancelled and stopped jobs."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from recon_server.ops import service_metrics as metrics
from recon_server.ops.http import OpsServer, queue_ready
from recon_server.recon import pipeline
from recon_server.service import worker as recon_worker


@pytest.fixture
def blocked(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """reconstruct_all waits for the event, honouring the stop check like a sampler would."""
    release = threading.Event()

    def fake(scan: Any, *, cancelled: Any = None, **_: Any) -> list[str]:
        while not release.wait(0.01):
            stop = cancelled() if cancelled is not None else None
            if stop is not None:
                raise stop
        return [scan]

    monkeypatch.setattr(recon_worker, "reconstruct_all", fake)
    return release


def test_readyz_false_while_the_queue_is_over_the_threshold(blocked: threading.Event) -> None:
    worker = recon_worker.ReconWorker(max_pending=8)
    ops = OpsServer(checks={"recon_queue": queue_ready(worker, 1)})
    wait_before = metrics.REGISTRY.value("recon_server_queue_wait_seconds_count")
    try:
        futures = [worker.submit(f"scan{i}", "cg-sense") for i in range(3)]  # type: ignore[arg-type]
        deadline = time.monotonic() + 5
        while worker.busy() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        ready, checks = ops.readiness()
        assert not ready and checks["recon_queue"]["detail"] == "2 scans waiting (threshold 1)"
        assert metrics.REGISTRY.render().count("recon_server_queue_waiting_scans 2.0\n") == 1
        blocked.set()
        assert [f.result(5) for f in futures] == [["scan0"], ["scan1"], ["scan2"]]
        ready, checks = ops.readiness()
        assert ready, checks
        assert metrics.REGISTRY.value("recon_server_queue_wait_seconds_count") == wait_before + 3
    finally:
        blocked.set()
        worker.stop(5)


def test_readyz_false_while_the_worker_is_stuck(blocked: threading.Event) -> None:
    worker = recon_worker.ReconWorker(time_limit=lambda method: 0.05)
    check = queue_ready(worker, 4, stuck_margin_s=0.0)
    try:
        worker.submit("scan", "cg-sense")  # type: ignore[arg-type]
        time.sleep(0.3)
        ok, detail = check()
        assert not ok and detail.startswith("reconstruction worker stuck: cg-sense running for"), detail
    finally:
        blocked.set()
        worker.stop(5)
    assert check()[0]


def test_cancelled_job_is_dropped_or_stopped_and_stop_ends_the_queue(blocked: threading.Event) -> None:
    worker = recon_worker.ReconWorker()
    gone = threading.Event()
    running = worker.submit("a", "cg-sense", cancel=gone)  # type: ignore[arg-type]
    queued = worker.submit("b", "cg-sense")  # type: ignore[arg-type]
    gone.set()
    with pytest.raises(pipeline.ReconCancelled, match="client went away"):
        running.result(5)
    assert worker.stop(5)
    with pytest.raises(recon_worker.ServiceStopping):
        queued.result(5)
    with pytest.raises(recon_worker.ServiceStopping):
        worker.submit("c", "cg-sense")  # type: ignore[arg-type]
