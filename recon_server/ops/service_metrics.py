"""The service's Prometheus metrics, on a project-owned ``prometheus_client`` registry.

:data:`REGISTRY` (a :class:`Registry`, a ``prometheus_client.CollectorRegistry`` that is not the
library's global default) holds the counters, gauges and histograms below plus scrape-time
collectors; ``/metrics`` (:mod:`recon_server.ops.http`) writes it with
``prometheus_client.generate_latest`` in the Prometheus text exposition format (0.0.4)::

    # HELP recon_server_scans_total Scans assembled from a stream, by listener.
    # TYPE recon_server_scans_total counter
    recon_server_scans_total{listener="mrd"} 3.0
    # HELP recon_server_stage_seconds Seconds per stage: ...
    # TYPE recon_server_stage_seconds histogram
    recon_server_stage_seconds_bucket{le="0.5",stage="reconstruct"} 1.0
    ...  recon_server_stage_seconds_bucket{le="+Inf",stage="reconstruct"} 3.0
    recon_server_stage_seconds_count{stage="reconstruct"} 3.0
    recon_server_stage_seconds_sum{stage="reconstruct"} 7.2

Counters are created with their exposed ``..._total`` name; ``_created`` series are switched off
(:func:`prometheus_client.disable_created_metrics`) so the exposition carries the same series as
before the move to ``prometheus_client``. Values only known at scrape time (spool depth, GPU
memory) come from :class:`SampleCollector` instances added with :meth:`Registry.add_collector`.
The hooks below are called by ``service.server`` / ``service.gadget``, the listeners, the
reconstruction worker and ``serve``'s output sinks.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

# No ``<name>_created`` gauges next to counters and histograms: the exposition keeps the series
# operators' dashboards know (this switch is process-wide in prometheus_client).
disable_created_metrics()

# Reconstruction stages range from milliseconds (send) to minutes (faithful DPS on a CPU).
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


@dataclass(frozen=True)
class Sample:
    """One sample of a scrape-time gauge: ``name{labels} value``."""

    name: str
    labels: dict[str, str]
    value: float


class SampleCollector(Collector):
    """A ``prometheus_client`` collector of gauge families filled at scrape time.

    ``help_by_name`` gives the help line of every metric name ``samples()`` may return; each
    scrape calls ``samples()`` once and yields one :class:`GaugeMetricFamily` per name (also
    when it has no samples now, as the families a collector describes).
    """

    def __init__(self, help_by_name: Mapping[str, str], samples: Callable[[], Iterable[Sample]]) -> None:
        self.help_by_name = dict(help_by_name)
        self.samples = samples

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Names only: describing must not run ``samples`` (it may touch CUDA or the disk).
        return [GaugeMetricFamily(name, help_text) for name, help_text in self.help_by_name.items()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families = {name: GaugeMetricFamily(name, h) for name, h in sorted(self.help_by_name.items())}
        for s in self.samples():
            family = families.get(s.name)
            if family is None:  # a name without a help line is not exposed
                continue
            family.add_sample(s.name, {k: str(v) for k, v in sorted(s.labels.items())}, float(s.value))
        return list(families.values())


class Registry(CollectorRegistry):
    """The project's ``CollectorRegistry``: collectors replaceable by key, and ``render()``."""

    def __init__(self) -> None:
        super().__init__()
        self._keyed: dict[str, Collector] = {}
        self._keyed_lock = threading.Lock()

    def add_collector(self, key: str, collector: Collector) -> None:
        """Register ``collector``, replacing the one registered before under ``key`` (if any)."""
        with self._keyed_lock:
            old = self._keyed.pop(key, None)
            if old is not None:
                self.unregister(old)
            self.register(collector)
            self._keyed[key] = collector

    def remove_collector(self, key: str) -> None:
        with self._keyed_lock:
            old = self._keyed.pop(key, None)
            if old is not None:
                self.unregister(old)

    def render(self) -> str:
        """The whole registry in the text exposition format (``generate_latest``)."""
        return generate_latest(self).decode()

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 when it does not exist yet), e.g. for tests."""
        return self.get_sample_value(name, labels) or 0.0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def parse_exposition(text: str) -> dict[str, float]:
    """``'name{labels}' -> value`` for every sample of a text exposition (tests, a quick look).

    Labels are written sorted by name, as ``generate_latest`` writes them, e.g.
    ``recon_server_streams_total{listener="mrd",outcome="ok"}``.
    """
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(s.labels.items()))
            values[s.name + ("{" + labels + "}" if labels else "")] = float(s.value)
    return values


# ------------------------------------------------------------------ the service's metrics

REGISTRY = Registry()
STREAMS = Counter(
    "recon_server_streams_total",
    "Client streams handled, by listener and outcome.",
    ("listener", "outcome"),
    registry=REGISTRY,
)
SCANS = Counter(
    "recon_server_scans_total",
    "Scans assembled from a stream, by listener.",
    ("listener",),
    registry=REGISTRY,
)
ERRORS = Counter(
    "recon_server_errors_total",
    "Failed streams and outputs, by where and error type.",
    ("where", "error"),
    registry=REGISTRY,
)
READOUTS = Counter(
    "recon_server_readouts_total", "Readouts received, by listener.", ("listener",), registry=REGISTRY
)
BYTES = Counter(
    "recon_server_received_bytes_total", "Stream bytes read, by listener.", ("listener",), registry=REGISTRY
)
IMAGES = Counter(
    "recon_server_images_sent_total",
    "ISMRMRD images sent back, by listener.",
    ("listener",),
    registry=REGISTRY,
)
QUEUE = Gauge(
    "recon_server_queue_length",
    "Scans submitted and not yet reconstructed (queued or running).",
    registry=REGISTRY,
)
STAGES = Histogram(
    "recon_server_stage_seconds",
    "Seconds per stage: receive (stream to assembled scans), wait (queue), reconstruct and the "
    "method's own stages (from the volume's provenance), output:<sink>, send.",
    ("stage",),
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
FALLBACKS = Counter(
    "recon_server_fallbacks_total",
    "Scans whose configured method failed and that were reconstructed with the fallback method, "
    "by configured method, fallback and reason (model-missing, cuda-unavailable, out-of-memory, error).",
    ("method", "fallback", "reason"),
    registry=REGISTRY,
)
QUEUE_WAITING = Gauge(
    "recon_server_queue_waiting_scans",
    "Scans queued for the reconstruction worker and not yet started.",
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "recon_server_queue_wait_seconds",
    "Seconds each reconstruction job waited in the queue before it started.",
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
CANCELLED = Counter(
    "recon_server_jobs_cancelled_total",
    "Reconstruction jobs dropped or stopped before their end, by method and reason "
    "(client-gone: the client closed the connection and no sink wanted the images; shutdown).",
    ("method", "reason"),
    registry=REGISTRY,
)
INFO = Gauge(
    "recon_server_info",
    "Constant 1, labelled with the version, backend and inference provider.",
    ("version", "backend", "provider"),
    registry=REGISTRY,
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
            STAGES.labels(stage=stage).observe(float(value))


# --------------------------------------------------------- hooks for the connection handlers


def scans_received(listener: str, *, scans: int, readouts: int, nbytes: int, seconds: float) -> None:
    """A stream was read and assembled: counts and the ``receive`` stage."""
    SCANS.labels(listener=listener).inc(scans)
    READOUTS.labels(listener=listener).inc(readouts)
    BYTES.labels(listener=listener).inc(nbytes)
    STAGES.labels(stage="receive").observe(seconds)


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
        STAGES.labels(stage="service").observe(time.perf_counter() - t0)


def volumes_done(volumes: Iterable[object]) -> None:
    """Per-volume reconstruction stages from the provenance (see :func:`observe_provenance`)."""
    for volume in volumes:
        settings = getattr(getattr(volume, "provenance", None), "settings", None)
        if isinstance(settings, dict):
            observe_provenance(settings)


def stream_done(listener: str, *, images: int, send_seconds: float) -> None:
    IMAGES.labels(listener=listener).inc(images)
    STAGES.labels(stage="send").observe(send_seconds)
    STREAMS.labels(listener=listener, outcome="ok").inc()


def fallback_used(method: str, fallback: str, reason: str) -> None:
    """A scan's configured ``method`` failed (``reason`` class) and ``fallback`` made its images."""
    FALLBACKS.labels(method=method, fallback=fallback, reason=reason).inc()


def job_cancelled(method: str, reason: str) -> None:
    """A reconstruction job was dropped or stopped (``client-gone``, ``shutdown``)."""
    CANCELLED.labels(method=method, reason=reason).inc()


def stream_failed(listener: str, exc: BaseException) -> None:
    STREAMS.labels(listener=listener, outcome="error").inc()
    ERRORS.labels(where=listener, error=type(exc).__name__).inc()
