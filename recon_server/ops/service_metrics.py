"""Counters, gauges and histograms, written in the Prometheus text exposition format (0.0.4).

A tiny thread-safe registry (no dependency): every metric has a name, a help line and fixed
label names; ``render()`` writes::

    # HELP recon_server_scans_total Scans assembled from a stream, by listener.
    # TYPE recon_server_scans_total counter
    recon_server_scans_total{listener="mrd"} 3
    # TYPE recon_server_stage_seconds histogram
    recon_server_stage_seconds_bucket{stage="reconstruct",le="0.5"} 1
    ...  recon_server_stage_seconds_bucket{stage="reconstruct",le="+Inf"} 3
    recon_server_stage_seconds_sum{stage="reconstruct"} 7.2
    recon_server_stage_seconds_count{stage="reconstruct"} 3

Histogram buckets are cumulative (``le`` = less or equal). Values that are only known at scrape
time (spool depth, GPU memory) come from *collectors*: callables returning samples, called by
``render()``. :data:`REGISTRY` holds the service's metrics (names below); the hooks in
``mrd.server`` / ``mrd.gadget`` and ``mrd.commands`` update them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

# Reconstruction stages range from milliseconds (send) to minutes (faithful DPS on a CPU).
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


@dataclass(frozen=True)
class Sample:
    """One line of a collector's output: ``name{labels} value``."""

    name: str
    labels: dict[str, str]
    value: float


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """Monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Gauge(Counter):
    """A value that goes up and down (set / inc / dec)."""

    kind = "gauge"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, plus ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> None:
        super().__init__(name, help_text, labelnames)
        bounds = sorted(float(b) for b in buckets or STAGE_BUCKETS)
        self.bounds = tuple(b for b in bounds if not math.isinf(b)) + (math.inf,)
        self._data: dict[LabelValues, tuple[list[int], float]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self._data.get(key, ([0] * len(self.bounds), 0.0))
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    counts[i] += 1
            self._data[key] = (counts, total + float(value))

    def count(self, **labels: str) -> int:
        with self._lock:
            counts, _ = self._data.get(self._key(labels), ([0] * len(self.bounds), 0.0))
            return counts[-1]

    @contextmanager
    def time(self, **labels: str) -> Iterator[None]:
        """Observe the wall time of a ``with`` block (also when it raises)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - t0, **labels)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s)) for k, (c, s) in self._data.items())
        out = []
        for key, (counts, total) in items:
            for bound, n in zip(self.bounds, counts, strict=True):
                le = 'le="' + _num(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {n}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_num(total)}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {counts[-1]}")
        return out


Collector = Callable[[], Iterable[Sample]]


class Registry:
    """Metrics by name plus scrape-time collectors (``gauge`` families they fill)."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: dict[str, tuple[str, Collector]] = {}
        self._lock = threading.Lock()

    def _add(self, metric: _Metric) -> _Metric:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        m = self._add(Counter(name, help_text, labelnames))
        assert isinstance(m, Counter)
        return m

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        m = self._add(Gauge(name, help_text, labelnames))
        assert isinstance(m, Gauge)
        return m

    def histogram(
        self, name: str, help_text: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> Histogram:
        m = self._add(Histogram(name, help_text, labelnames, buckets))
        assert isinstance(m, Histogram)
        return m

    def add_collector(self, key: str, help_by_name: dict[str, str], collect: Collector) -> None:
        """Register (or replace, by ``key``) a scrape-time source of gauge samples.

        ``help_by_name`` gives the help line of every metric name the collector emits.
        """
        with self._lock:
            for name, help_text in help_by_name.items():
                self._collectors[f"{key}:{name}"] = (help_text, collect)

    def remove_collector(self, key: str) -> None:
        with self._lock:
            for k in [k for k in self._collectors if k.startswith(f"{key}:")]:
                del self._collectors[k]

    def render(self) -> str:
        """The whole registry in the text exposition format (ends with a newline)."""
        with self._lock:
            metrics = list(self._metrics.values())
            collectors = dict(self._collectors)
        out: list[str] = []
        for m in metrics:
            out += m.header() + m.lines()
        # Each collector runs once per scrape even if it emits several names.
        samples_by_collector: dict[int, list[Sample]] = {}
        by_name: dict[str, tuple[str, list[Sample]]] = {}
        for key, (help_text, collect) in collectors.items():
            name = key.split(":", 1)[1]
            if id(collect) not in samples_by_collector:
                samples_by_collector[id(collect)] = list(collect())
            samples = [s for s in samples_by_collector[id(collect)] if s.name == name]
            entry = by_name.setdefault(name, (help_text, []))
            entry[1].extend(samples)
        for name, (help_text, samples) in sorted(by_name.items()):
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for s in samples:
                names = tuple(sorted(s.labels))
                out.append(f"{name}{_labels(names, [s.labels[n] for n in names])} {_num(s.value)}")
        return "\n".join(out) + "\n"


def parse_exposition(text: str) -> dict[str, float]:
    """``'name{labels}' -> value`` for every sample line (tests, and a quick CLI look)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        values[key] = float(value)
    return values


# ------------------------------------------------------------------ the service's metrics

REGISTRY = Registry()
STREAMS = REGISTRY.counter(
    "recon_server_streams_total", "Client streams handled, by listener and outcome.", ("listener", "outcome")
)
SCANS = REGISTRY.counter(
    "recon_server_scans_total", "Scans assembled from a stream, by listener.", ("listener",)
)
ERRORS = REGISTRY.counter(
    "recon_server_errors_total", "Failed streams and outputs, by where and error type.", ("where", "error")
)
READOUTS = REGISTRY.counter("recon_server_readouts_total", "Readouts received, by listener.", ("listener",))
BYTES = REGISTRY.counter(
    "recon_server_received_bytes_total", "Stream bytes read, by listener.", ("listener",)
)
IMAGES = REGISTRY.counter(
    "recon_server_images_sent_total", "ISMRMRD images sent back, by listener.", ("listener",)
)
QUEUE = REGISTRY.gauge(
    "recon_server_queue_length", "Scans submitted and not yet reconstructed (queued or running)."
)
STAGES = REGISTRY.histogram(
    "recon_server_stage_seconds",
    "Seconds per stage: receive (stream to assembled scans), wait (queue), reconstruct and the "
    "method's own stages (from the volume's provenance), output:<sink>, send.",
    ("stage",),
)
FALLBACKS = REGISTRY.counter(
    "recon_server_fallbacks_total",
    "Scans whose configured method failed and that were reconstructed with the fallback method, "
    "by configured method, fallback and reason (model-missing, cuda-unavailable, out-of-memory, error).",
    ("method", "fallback", "reason"),
)
QUEUE_WAITING = REGISTRY.gauge(
    "recon_server_queue_waiting_scans", "Scans queued for the reconstruction worker and not yet started."
)
QUEUE_WAIT = REGISTRY.histogram(
    "recon_server_queue_wait_seconds",
    "Seconds each reconstruction job waited in the queue before it started.",
)
CANCELLED = REGISTRY.counter(
    "recon_server_jobs_cancelled_total",
    "Reconstruction jobs dropped or stopped before their end, by method and reason "
    "(client-gone: the client closed the connection and no sink wanted the images; shutdown).",
    ("method", "reason"),
)
INFO = REGISTRY.gauge(
    "recon_server_info",
    "Constant 1, labelled with the version, backend and inference provider.",
    ("version", "backend", "provider"),
)


def observe_provenance(settings: dict[str, object]) -> None:
    """Record the reconstruction times a volume's provenance carries.

    ``settings["seconds"]`` (the whole ``pipeline.reconstruct``) -> stage ``reconstruct``; any
    other number whose key starts with ``seconds_`` (the pipeline's ``seconds_prewhiten``,
    ``seconds_coils``, ``seconds_method``) or ends in ``_seconds`` -> a stage of that name
    without the affix; a dict ``settings["timings"]`` of
    ``stage -> seconds`` -> those stages.
    """
    stages: dict[str, object] = {}
    for key, value in settings.items():
        if key == "seconds":
            stages["reconstruct"] = value
        elif key.startswith("seconds_"):
            stages[key.removeprefix("seconds_")] = value
        elif key.endswith("_seconds"):
            stages[key.removesuffix("_seconds")] = value
    timings = settings.get("timings")
    if isinstance(timings, dict):
        stages.update({str(k): v for k, v in timings.items()})
    for stage, value in stages.items():
        if not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value):
            STAGES.observe(float(value), stage=stage)


# --------------------------------------------------------- hooks for the connection handlers


def scans_received(listener: str, *, scans: int, readouts: int, nbytes: int, seconds: float) -> None:
    """A stream was read and assembled: counts and the ``receive`` stage."""
    SCANS.inc(scans, listener=listener)
    READOUTS.inc(readouts, listener=listener)
    BYTES.inc(nbytes, listener=listener)
    STAGES.observe(seconds, stage="receive")


@contextmanager
def in_service(listener: str, scans: int) -> Iterator[None]:
    """Around ``ReconService.run``: queue length up while the scans are queued or running, and
    the ``service`` stage (queue wait + reconstruction + outputs)."""
    QUEUE.inc(scans)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        QUEUE.dec(scans)
        STAGES.observe(time.perf_counter() - t0, stage="service")


def volumes_done(volumes: Iterable[object]) -> None:
    """Per-volume reconstruction stages from the provenance (see :func:`observe_provenance`)."""
    for volume in volumes:
        settings = getattr(getattr(volume, "provenance", None), "settings", None)
        if isinstance(settings, dict):
            observe_provenance(settings)


def stream_done(listener: str, *, images: int, send_seconds: float) -> None:
    IMAGES.inc(images, listener=listener)
    STAGES.observe(send_seconds, stage="send")
    STREAMS.inc(listener=listener, outcome="ok")


def fallback_used(method: str, fallback: str, reason: str) -> None:
    """A scan's configured ``method`` failed (``reason`` class) and ``fallback`` made its images."""
    FALLBACKS.inc(method=method, fallback=fallback, reason=reason)


def job_cancelled(method: str, reason: str) -> None:
    """A reconstruction job was dropped or stopped (``client-gone``, ``shutdown``)."""
    CANCELLED.inc(method=method, reason=reason)


def stream_failed(listener: str, exc: BaseException) -> None:
    STREAMS.inc(listener=listener, outcome="error")
    ERRORS.inc(where=listener, error=type(exc).__name__)
