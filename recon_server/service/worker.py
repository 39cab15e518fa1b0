"""The service's reconstruction queue: one worker thread (one device) and the sinks after it.

:class:`ReconWorker` serialises every reconstruction through one bounded queue and thread (one
GPU); :class:`ReconService` submits a stream's scans, waits for them (polling the connection) and
hands each volume to every output sink in order, recording what was delivered in the scan journal.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from typing import Protocol

from recon_server.ops import service_metrics
from recon_server.recon.methods import DiffusionSettings
from recon_server.recon.pipeline import Progress, ReconCancelled, reconstruct_all
from recon_server.scan import ImageVolume, KSpaceScan
from recon_server.service.config import DEFAULT_FALLBACK_METHOD, ServiceConfig

log = logging.getLogger(__name__)

Sink = Callable[[ImageVolume], None]


class ServiceStopping(ReconCancelled):
    """The server shuts down: the scan stays in the journal and a restart reconstructs it."""


def volume_key(volume: ImageVolume) -> str:
    """A volume's name within its stream's scans (``<role>-<series_index>``), for the journal."""
    return f"{volume.role}-{volume.series_index}"


class DeliveryLog(Protocol):
    """Where :meth:`ReconService.run` records what reached every sink (the scan journal)."""

    @property
    def tag(self) -> str: ...

    def planned(self, keys: list[str]) -> None: ...

    def is_delivered(self, key: str) -> bool: ...

    def delivered(self, key: str) -> None: ...

    def output_failed(self, key: str, reason: str) -> None: ...


@dataclasses.dataclass
class _Job:
    scan: KSpaceScan
    method: str
    samples: int | None
    progress: Callable[[Progress], None] | None
    context: contextvars.Context  # the submitting connection's (measurement id in every log line)
    future: Future
    cancel: threading.Event | None = None  # set by the connection: the client went away
    submitted: float = dataclasses.field(default_factory=time.monotonic)


class ReconWorker:
    """One thread that runs every reconstruction in order (one device, bounded queue).

    ``time_limit(method)`` seconds (``ServiceConfig.time_limit_for``; None: no limit) bound each
    method run: the diffusion samplers stop at the next step past it (:class:`TimeLimitExceeded`,
    a TimeoutError) and the fallback reconstructs the scan, or the scan fails without one. The
    classical methods have no step check; they finish. A job whose ``cancel`` event is set is
    dropped before it starts or stopped at the next step (:class:`ReconCancelled`, no fallback);
    :meth:`stop` does the same to every job.
    """

    def __init__(
        self,
        *,
        device: str = "cpu",
        max_pending: int = 8,
        fallback: str | None = DEFAULT_FALLBACK_METHOD,
        time_limit: Callable[[str], float | None] | None = None,
        diffusion: DiffusionSettings | None = None,
    ) -> None:
        self.device = device
        # The diffusion methods' settings; use_denoiser swaps in a model loaded after the start.
        self.diffusion = diffusion or DiffusionSettings(device=device)
        self.fallback = fallback  # reconstructs a scan whose method failed (None: the scan fails)
        self.time_limit = time_limit or (lambda method: None)
        self._queue: queue.Queue[_Job | None] = queue.Queue(max_pending)
        self._stopping = threading.Event()
        self._busy: tuple[float, str] | None = None  # (monotonic start, method) of the running job
        self._thread = threading.Thread(target=self._run, name="recon-worker", daemon=True)
        self._thread.start()

    def use_denoiser(self, denoiser: object) -> None:
        """Run the diffusion methods on ``denoiser`` from the next scan on (a preloaded model)."""
        self.diffusion = dataclasses.replace(self.diffusion, denoiser=denoiser)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet started."""
        return self._queue.qsize()

    def busy(self) -> tuple[float, str] | None:
        """``(seconds running, method)`` of the running job, or None when idle."""
        busy = self._busy
        return None if busy is None else (time.monotonic() - busy[0], busy[1])

    def stuck(self, *, margin_s: float = 60.0) -> str:
        """Why the worker looks stuck (running past its method's time limit + ``margin_s``), or ``""``."""
        busy = self.busy()
        if busy is None:
            return ""
        seconds, method = busy
        limit = self.time_limit(method)
        if limit is not None and seconds > limit + margin_s:
            return f"{method} running for {seconds:.0f} s (time limit {limit:g} s)"
        return ""

    def submit(
        self,
        scan: KSpaceScan,
        method: str,
        *,
        samples: int | None = None,
        cancel: threading.Event | None = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> Future:
        """Queue a scan; the future resolves to its volumes (:func:`reconstruct_all`) or its exception.

        ``progress`` is called on the worker thread as slices are done."""
        if self._stopping.is_set():
            raise ServiceStopping("server shutting down")
        future: Future = Future()
        self._queue.put(_Job(scan, method, samples, progress, contextvars.copy_context(), future, cancel))
        service_metrics.QUEUE_WAITING.set(self._queue.qsize())
        return future

    def _cancelled(self, job: _Job) -> ReconCancelled | None:
        if self._stopping.is_set():
            return ServiceStopping("server shutting down")
        if job.cancel is not None and job.cancel.is_set():
            return ReconCancelled("the client went away")
        return None

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            service_metrics.QUEUE_WAITING.set(self._queue.qsize())
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            stop = self._cancelled(job)
            if stop is not None:
                reason = "shutdown" if isinstance(stop, ServiceStopping) else "client-gone"
                service_metrics.job_cancelled(job.method, reason)
                job.future.set_exception(stop)
                continue
            service_metrics.QUEUE_WAIT.observe(time.monotonic() - job.submitted)
            self._busy = (time.monotonic(), job.method)
            try:
                volumes = job.context.run(
                    functools.partial(
                        reconstruct_all,
                        job.scan,
                        method=job.method,
                        device=self.device,
                        samples=job.samples,
                        fallback=self.fallback,
                        time_limit=self.time_limit,
                        cancelled=functools.partial(self._cancelled, job),
                        diffusion=self.diffusion,
                        progress=job.progress,
                    )
                )
                job.future.set_result(volumes)
            except Exception as exc:  # noqa: BLE001 - handed to the waiting connection
                if isinstance(exc, ReconCancelled):
                    reason = "shutdown" if isinstance(exc, ServiceStopping) else "client-gone"
                    service_metrics.job_cancelled(job.method, reason)
                job.future.set_exception(exc)
            finally:
                self._busy = None

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Drop the queued jobs (:class:`ServiceStopping`), stop the running one at its next step
        and end the thread; True when it ended within ``timeout_s``."""
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(ServiceStopping("server shutting down"))
        try:
            self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()

    def close(self) -> None:
        self.stop(5.0)


#: Seconds between two looks at ``poll`` while a connection waits for its reconstruction.
POLL_INTERVAL_S = 0.2


class ReconService:
    """Scans -> volumes through the worker, then every sink (DICOM writer, spool...) in order."""

    def __init__(
        self,
        *,
        methods: Callable[[str], str],
        worker: ReconWorker,
        sinks: list[Sink] | None = None,
    ) -> None:
        self.methods = methods
        self.worker = worker
        self.sinks = list(sinks or [])

    def run(
        self,
        scans: list[KSpaceScan],
        *,
        method: str | None = None,
        samples: int | None = None,
        delivery: DeliveryLog | None = None,
        cancel: threading.Event | None = None,
        poll: Callable[[], None] | None = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> list[ImageVolume]:
        """Reconstruct each scan (``method`` overrides the per-contrast choice) and feed the sinks.

        Returns every volume in scan order: each image, followed by its SD map when posterior
        samples were drawn. ``poll()`` is called every :data:`POLL_INTERVAL_S` while waiting; an
        exception it raises ends the wait (``cancel`` is set first, so the worker drops or stops
        the jobs). ``delivery`` records the volumes planned and those every sink took; volumes it
        already holds are not delivered again (a restart after a crash).
        """
        cancel = cancel if cancel is not None else threading.Event()
        try:
            futures = [
                self.worker.submit(
                    scan,
                    method or self.methods(scan.contrast),
                    samples=samples,
                    cancel=cancel,
                    progress=progress,
                )
                for scan in scans
            ]
            volumes = [volume for f in futures for volume in self._wait(f, poll)]
        except BaseException:
            cancel.set()
            raise
        self.deliver(volumes, delivery)
        return volumes

    @staticmethod
    def _wait(future: Future, poll: Callable[[], None] | None) -> list[ImageVolume]:
        while poll is not None:
            done, _ = futures_wait([future], timeout=POLL_INTERVAL_S)
            if done:
                break
            poll()
        return future.result()

    def deliver(self, volumes: list[ImageVolume], delivery: DeliveryLog | None = None) -> None:
        """Every sink, volume by volume; a failing sink is logged (and recorded in ``delivery``)."""
        from recon_server.dicom.spool import DELIVERY_TAG  # pydicom only when delivering

        if delivery is not None:
            delivery.planned([volume_key(v) for v in volumes])
        for volume in volumes:
            key = volume_key(volume)
            if delivery is not None and delivery.is_delivered(key):
                log.info("measurement %s: volume %s was delivered before", volume.measurement_id, key)
                continue
            failures = []
            token = DELIVERY_TAG.set(f"{delivery.tag}/{key}" if delivery is not None else None)
            try:
                for sink in self.sinks:
                    # A failing output (e.g. DICOM refused for missing identifiers) must not cost the
                    # peer its images: log it with the scan id and go on; the sink keeps what it wrote.
                    name = getattr(sink, "__name__", type(sink).__name__)
                    try:
                        sink(volume)
                    except (ValueError, OSError) as exc:
                        log.error("measurement %s: output %s failed: %s", volume.measurement_id, name, exc)
                        failures.append(f"output {name}: {type(exc).__name__}: {exc}")
            finally:
                DELIVERY_TAG.reset(token)
            if delivery is not None:
                if failures:
                    delivery.output_failed(key, "; ".join(failures))
                else:
                    delivery.delivered(key)


def worker_for(config: ServiceConfig) -> ReconWorker:
    """A worker with the configuration's device, queue bound, fallback, time limits and model."""
    return ReconWorker(
        device=config.device,
        max_pending=config.max_pending_scans,
        fallback=config.fallback_method,
        time_limit=config.time_limit_for,
        diffusion=config.diffusion_settings(),
    )
