"""Bounded fuzzing of the stream server (in-process, loopback): a few hundred hostile streams of
several seeds (:mod:`recon_server.service.fuzz`); after each batch the server is alive, serves a valid
scan exactly as before, and has not grown in memory, threads or descriptors."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from recon_server.mrd import wire
from recon_server.service import fuzz
from recon_server.service.config import ServiceConfig
from recon_server.service.server import StreamServer

SEEDS = (11, 12, 13)
STREAMS_PER_SEED = 90
BATCH = 30
KEPT = "raw data kept on the server as "
CLOSE = fuzz.encode([wire.Close()])


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_hostile_streams_leave_the_server_serving(tmp_path: Path) -> None:
    kept_dir = tmp_path / "failed"
    server = StreamServer(
        ServiceConfig(
            port=0,
            default_method="zero-filled",
            socket_timeout_s=10,
            stream_deadline_s=30,
            failed_scans_dir=kept_dir,
        )
    )
    server.start()
    assert server.address is not None
    scan = fuzz.valid_scan()
    try:
        texts, images = fuzz.exchange(server.address, fuzz.stream(scan), half_close=False)
        assert texts == [] and len(images) == 1
        reference = images[0].data
        assert np.corrcoef(reference[0, 0].ravel(), scan.phantom.ravel())[0, 1] > 0.99
        kinds: collections.Counter[str] = collections.Counter()
        told: list[str] = []
        baseline: tuple[int, int, int] | None = None
        failed_with_data = 0  # failing streams that gave the server a header and readouts
        t0 = time.perf_counter()
        for seed in SEEDS:
            streams = iter(fuzz.Mutator(seed, scan))
            for batch in range(STREAMS_PER_SEED // BATCH):
                for _ in range(BATCH):
                    item = next(streams)
                    kinds[item.kind] += 1
                    # A stream that ends in CLOSE is complete; one that does not is ended by a
                    # half-close (a half-closed client of a valid scan counts as gone: its scan is
                    # kept without a reply, so it would not be told).
                    ends = item.payload.endswith(CLOSE)
                    texts, _ = fuzz.exchange(server.address, item.payload, half_close=not ends)
                    told += [t.rsplit(KEPT, 1)[1].rstrip(")") for t in texts if KEPT in t]
                    failed_with_data += item.sends_data and any(t.startswith("ERR ") for t in texts)
                texts, images = fuzz.exchange(server.address, fuzz.stream(scan), half_close=False)
                assert texts == [] and len(images) == 1, (seed, batch, texts)
                assert np.array_equal(images[0].data, reference), (seed, batch)
                time.sleep(0.2)  # handler threads of the batch finish
                now = (rss_bytes(), threading.active_count(), len(list(Path("/proc/self/fd").iterdir())))
                if baseline is None:
                    baseline = now  # after the first batch: caches and pools warmed up
                    continue
                assert now[0] - baseline[0] < 150 << 20, f"RSS grew by {(now[0] - baseline[0]) >> 20} MiB"
                assert now[1] <= baseline[1] + 2, f"threads {baseline[1]} -> {now[1]}"
                assert now[2] <= baseline[2] + 4, f"open descriptors {baseline[2]} -> {now[2]}"
        assert set(kinds) == set(fuzz.KINDS), kinds
        assert time.perf_counter() - t0 < 120
        files = sorted(p.name for p in kept_dir.glob("*.h5"))
        assert len(told) == len(set(told)) == len(files) == failed_with_data and set(told) == set(files)
        assert kinds["meas-id"] and told, "hostile measurement ids were not kept"
        assert server._loop is not None and server._loop.alive
    finally:
        server.stop()


@pytest.mark.parametrize("seed", [3])
def test_the_generator_is_reproducible(seed: int) -> None:
    scan = fuzz.valid_scan()
    a, b = iter(fuzz.Mutator(seed, scan)), iter(fuzz.Mutator(seed, scan))
    for _ in range(40):
        x, y = next(a), next(b)
        assert (x.kind, x.payload, x.sends_data) == (y.kind, y.payload, y.sends_data)
