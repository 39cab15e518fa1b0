"""One scan's k-space -> one image volume: the function the server, gadget and CLI all call.

Steps of :func:`reconstruct`:

1. Noise prewhitening when the scan carries a noise measurement: ``W`` with
   ``W Psi W^H = I`` for the noise covariance ``Psi``, applied over the coil axis to the
   k-space and the calibration data.
2. Coil maps from the calibration region by ESPIRiT (at most ``MAX_CALIBRATION_ROWS``
   central rows). If ESPIRiT rejects the calibration (ValueError / RuntimeError, e.g. fewer
   rows than its kernel), Inati maps from the same calibration are used and the fallback is
   recorded in the provenance settings.
3. The method from the registry (``recon.methods.run_method``) on a ``ReconProblem``; the
   diffusion methods add the model name/version and the sampler settings to the provenance.
4. Magnitude, scaled so that the 99th percentile of the volume is ``TARGET_P99`` (a stable
   range for uint16 / DICOM); the factor is stored as ``settings["intensity_scale"]``.
5. Window centre/width from the 0.5th and 99.5th percentiles; series description = the
   protocol name (or contrast); the ISMRMRD and DICOM writers both add the same method mark
   through ``dicom.writer.dicom_series_description``.
6. Stage timings in ``settings``: ``seconds_prewhiten``, ``seconds_coils``, ``seconds_method``,
   ``seconds`` (total).

:func:`reconstruct_all` returns the image volume and, when a diffusion method drew several
posterior samples (``samples > 1``), a second volume: the per-pixel standard deviation of the
magnitude over the samples, on the image's intensity scale, ``role="sd"``, series index
``image + SD_SERIES_OFFSET``, description ``"<protocol> uncertainty (SD)"``, ImageType
``DERIVED\\SECONDARY\\OTHER\\SD``. Every sink writes it like any volume (its own DICOM series).

:class:`ReconWorker` serialises all reconstructions through one queue and thread (one GPU).

Fallback (``reconstruct_all(..., fallback=...)``; the worker passes ``ServiceConfig.fallback_method``,
``cg-sense`` by default): when the method raises one of :data:`FALLBACK_ERRORS` (model missing or
failing to load, CUDA asked for without CUDA, out of memory, the method's own RuntimeError /
ValueError), the scan is reconstructed again with the fallback method. Its volumes are marked:
``provenance.method`` = the fallback, ``provenance.settings["fallback_from"]`` = the method that
failed, ``settings["fallback_reason"]`` = one line (``"<class>: <Exception>: <message>"``, class
from :func:`failure_class`), series description suffix ``" (fallback: <method>)"``. One warning
line is logged and ``recon_server_fallbacks_total{method,fallback,reason}`` counts each scan the
fallback delivered. The fallback runs on the CPU when the reason is ``cuda-unavailable`` or
``out-of-memory``, else on the same device. Only when the fallback fails too does the scan fail
(:class:`FallbackFailed`, naming both errors). An unknown method name is not a failure of the
method: it raises ValueError before any work, without a fallback. A scan without calibration
data (``KSpaceScan.acs == (0, 0)``) has no coil maps: ``zero-filled`` gives the root sum of squares,
every other method raises :class:`NoCalibrationError`, and its fallback is ``zero-filled``
(:data:`MAPLESS_METHOD`) whatever fallback is configured.
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

import numpy as np
import torch

from recon_server import __version__
from recon_server.mrd.assemble import parse_header
from recon_server.ops import service_metrics as ops_metrics
from recon_server.recon import classic, coils, noise
from recon_server.recon.dps import SamplingStopped, stop_check
from recon_server.recon.methods import MethodOutput, ReconProblem, get_method, run_method
from recon_server.scan import ImageVolume, KSpaceScan, Provenance
from recon_server.service.config import DEFAULT_FALLBACK_METHOD

log = logging.getLogger(__name__)

MAX_CALIBRATION_ROWS = 24
TARGET_P99 = 1000.0
SD_SERIES_OFFSET = 500
SD_IMAGE_TYPE = ["DERIVED", "SECONDARY", "OTHER", "SD"]

Sink = Callable[[ImageVolume], None]

#: Exceptions of a method that make the fallback reconstruct the scan (torch.OutOfMemoryError is a
#: RuntimeError; a missing model file is an OSError or a CheckpointError, a ValueError).
FALLBACK_ERRORS: tuple[type[Exception], ...] = (RuntimeError, MemoryError, ValueError, OSError, ImportError)
MAX_REASON_CHARS = 240


class FallbackFailed(RuntimeError):
    """The scan's method failed and its fallback method failed too."""


class NoCalibrationError(ValueError):
    """The scan has no calibration data: no coil maps, only the root sum of squares."""


#: The one method that needs no coil maps (root sum of squares without calibration data); the
#: fallback of a scan without calibration, whatever fallback is configured.
MAPLESS_METHOD = "zero-filled"


def failure_class(exc: BaseException) -> str:
    """Short reason class of a method failure (a metric label): ``no-calibration``,
    ``model-missing``, ``cuda-unavailable``, ``out-of-memory`` or ``error``."""
    from recon_server.dpm.checkpoint import CheckpointError

    text = f"{type(exc).__name__}: {exc}".lower()
    if isinstance(exc, NoCalibrationError):
        return "no-calibration"
    if isinstance(exc, SamplingStopped):
        return "time-limit"
    if isinstance(exc, MemoryError | torch.OutOfMemoryError) or "out of memory" in text:
        return "out-of-memory"
    cuda_words = ("not available", "no cuda gpus", "not compiled with cuda", "driver", "no kernel image")
    if ("cuda" in text or "nvidia" in text) and any(word in text for word in cuda_words):
        return "cuda-unavailable"
    model_words = ("model directory", "model card", "weight file", "checkpoint", "card.json", "onnx")
    if isinstance(exc, CheckpointError | FileNotFoundError | ImportError) or any(
        w in text for w in model_words
    ):
        return "model-missing"
    return "error"


def failure_reason(exc: BaseException) -> str:
    """One line: ``"<class>: <Exception>: <message>"`` (whitespace folded, bounded)."""
    message = " ".join(str(exc).split())
    line = f"{failure_class(exc)}: {type(exc).__name__}" + (f": {message}" if message else "")
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 3] + "..."


def fallback_note(provenance: Provenance) -> str:
    """``"<configured> -> <fallback>: <reason>"`` for fallback volumes, else ``""``."""
    settings = provenance.settings
    if "fallback_from" not in settings:
        return ""
    return f"{settings['fallback_from']} -> {provenance.method}: {settings.get('fallback_reason', '')}"


def mark_fallback(volume: ImageVolume, *, method: str, reason: str) -> ImageVolume:
    """The volume marked as made by its (fallback) method instead of ``method`` (module docstring)."""
    settings = {**volume.provenance.settings, "fallback_from": method, "fallback_reason": reason}
    return dataclasses.replace(
        volume,
        provenance=dataclasses.replace(volume.provenance, settings=settings),
        series_description=f"{volume.series_description} (fallback: {volume.provenance.method})",
    )


def _calibration(scan: KSpaceScan) -> np.ndarray:
    rows = scan.calibration.shape[-2]
    if rows <= MAX_CALIBRATION_ROWS:
        return scan.calibration
    start = (rows - MAX_CALIBRATION_ROWS) // 2
    return scan.calibration[..., start : start + MAX_CALIBRATION_ROWS, :]


def coil_maps(calibration: torch.Tensor, image_shape: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """ESPIRiT maps, or Inati maps if ESPIRiT rejects the calibration; returns (maps, name)."""
    try:
        return coils.espirit_maps(calibration, image_shape), "espirit"
    except (ValueError, RuntimeError) as exc:
        log.warning("ESPIRiT failed (%s); using Inati coil maps", exc)
        return coils.inati_maps(calibration, image_shape), "inati"


def protocol_name(header_xml: str) -> str:
    """measurementInformation.protocolName of the header, or ``""``."""
    info = parse_header(header_xml).measurementInformation
    return str(info.protocolName) if info is not None and info.protocolName else ""


def reconstruct(scan: KSpaceScan, *, method: str, device: str | torch.device = "cpu") -> ImageVolume:
    """Reconstruct one assembled scan with the named method (see the module docstring)."""
    return reconstruct_all(scan, method=method, device=device)[0]


def _window(magnitude: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(v) for v in np.percentile(magnitude, [0.5, 99.5])) if magnitude.size else (0.0, 1.0)
    return (lo + hi) / 2, max(hi - lo, 1.0)


def reconstruct_all(
    scan: KSpaceScan,
    *,
    method: str,
    device: str | torch.device = "cpu",
    samples: int | None = None,
    fallback: str | None = None,
    time_limit: Callable[[str], float | None] | None = None,
    cancelled: Callable[[], ReconCancelled | None] | None = None,
) -> list[ImageVolume]:
    """The image volume, plus its SD-map volume when ``samples`` > 1 posterior samples were drawn.

    ``samples=None`` uses the configured number (``recon.methods.configure_diffusion``).
    ``fallback``: the method that reconstructs the scan if ``method`` fails (module docstring);
    None (or the same method): the failure is raised. ``time_limit(method)``: seconds each method
    may run (None: no limit); a diffusion sampler past it raises :class:`TimeLimitExceeded`, which
    the fallback handles like any failure. ``cancelled()`` returning a :class:`ReconCancelled`
    stops the samplers at their next step with it (no fallback).
    """
    limit = time_limit or (lambda name: None)
    get_method(method)  # ValueError for unknown names, before any work
    if fallback is not None:
        get_method(fallback)
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    try:
        with stop_check(_stop_check(method, limit(method), cancelled)):
            return _reconstruct_all(scan, method=method, device=device, samples=samples)
    except FALLBACK_ERRORS as exc:
        if isinstance(exc, ReconCancelled):
            raise
        if isinstance(exc, NoCalibrationError) and fallback is not None:
            fallback = MAPLESS_METHOD
        if fallback is None or fallback == method:
            raise
        reason = failure_reason(exc)
        reason_class = failure_class(exc)
        log.warning(
            "measurement %s: method %s failed (%s); reconstructing with the fallback method %s",
            scan.measurement_id or "-",
            method,
            reason,
            fallback,
        )
        fallback_device: str | torch.device = device
        if reason_class in ("cuda-unavailable", "out-of-memory"):
            if reason_class == "out-of-memory" and torch.cuda.is_available():
                torch.cuda.empty_cache()
            fallback_device = "cpu"
        try:
            with stop_check(_stop_check(fallback, limit(fallback), cancelled)):
                volumes = _reconstruct_all(scan, method=fallback, device=fallback_device, samples=samples)
        except FALLBACK_ERRORS as exc2:
            if isinstance(exc2, ReconCancelled):
                raise
            raise FallbackFailed(
                f"method {method} failed ({reason}); the fallback {fallback} failed too: "
                f"{type(exc2).__name__}: {' '.join(str(exc2).split())}"
            ) from exc2
    ops_metrics.fallback_used(method, fallback, reason_class)
    return [mark_fallback(volume, method=method, reason=reason) for volume in volumes]


def prewhitened(scan: KSpaceScan, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(k-space, calibration rows, whitened)``: complex64 tensors on ``device``, prewhitened with
    the scan's noise measurement when it has one (more samples than coils)."""
    kspace = torch.from_numpy(np.ascontiguousarray(scan.kspace, dtype=np.complex64)).to(device)
    calib = torch.from_numpy(np.ascontiguousarray(_calibration(scan), dtype=np.complex64)).to(device)
    if scan.noise is None or scan.noise.shape[-1] <= scan.noise.shape[0]:
        return kspace, calib, False
    w = noise.whitening_matrix(
        torch.from_numpy(np.ascontiguousarray(scan.noise, dtype=np.complex64)).to(device)
    )
    return noise.prewhiten(kspace, w), noise.prewhiten(calib, w), True


def recon_problem(
    scan: KSpaceScan, kspace: torch.Tensor, maps: torch.Tensor, *, whitened: bool
) -> ReconProblem:
    """The methods' input for ``scan`` from its (prewhitened) k-space and coil maps."""
    return ReconProblem(
        kspace=kspace,
        maps=maps,
        mask=torch.from_numpy(np.asarray(scan.mask, dtype=bool)).to(kspace.device),
        acceleration=float(scan.acceleration),
        contrast=scan.contrast,
        noise_sigma=1.0 if whitened else None,  # whitened: unit noise
    )


def _reconstruct_all(
    scan: KSpaceScan, *, method: str, device: str | torch.device, samples: int | None
) -> list[ImageVolume]:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {dev} requested but CUDA is not available on this host")
    t0 = time.perf_counter()
    kspace, calib, whitened = prewhitened(scan, dev)
    settings: dict[str, object] = {"acceleration": float(scan.acceleration), "acs": list(scan.acs)}
    if whitened:
        settings["prewhitened"] = True
    t1 = time.perf_counter()
    if calib.shape[-2] == 0:  # no ACS lines and no fully sampled centre (KSpaceScan.acs == (0, 0))
        if method != MAPLESS_METHOD:
            raise NoCalibrationError(
                f"no calibration data (no ACS lines and no fully sampled k-space centre): {method} "
                f"needs coil maps; only {MAPLESS_METHOD} (root sum of squares) reconstructs this scan"
            )
        settings["coil_maps"] = "none (root sum of squares)"
        t2 = time.perf_counter()
        out = MethodOutput(image=classic.rss(kspace))
    else:
        maps, maps_name = coil_maps(calib, (kspace.shape[-2], kspace.shape[-1]))
        settings["coil_maps"] = maps_name
        t2 = time.perf_counter()
        out = run_method(method, recon_problem(scan, kspace, maps, whitened=whitened), samples=samples)
    t3 = time.perf_counter()
    settings.update(out.settings)
    magnitude = out.image.abs().to(torch.float32).cpu().numpy()
    p99 = float(np.percentile(magnitude, 99.0)) if magnitude.size else 0.0
    scale = TARGET_P99 / p99 if p99 > 0 else 1.0
    magnitude = (magnitude * scale).astype(np.float32)
    settings["intensity_scale"] = scale
    settings["seconds_prewhiten"] = round(t1 - t0, 3)
    settings["seconds_coils"] = round(t2 - t1, 3)
    settings["seconds_method"] = round(t3 - t2, 3)
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    label = protocol_name(scan.header_xml) or scan.contrast or "MR"
    provenance = Provenance(
        method=method,
        settings=settings,
        model_name=out.model_name,
        model_version=out.model_version,
        software_version=__version__,
    )
    center, width = _window(magnitude)
    image = ImageVolume(
        magnitude=magnitude,
        geometry=list(scan.geometry),
        header_xml=scan.header_xml,
        provenance=provenance,
        series_description=label,
        window_center=center,
        window_width=width,
        series_index=scan.contrast_index * 1000 + scan.repetition + 1,
        contrast=scan.contrast,
        measurement_id=scan.measurement_id,
        measurement_uid=scan.measurement_uid,
        raw_digest=scan.raw_digest,
    )
    volumes = [image]
    if out.std is not None:
        sd = (out.std.to(torch.float32).cpu().numpy() * scale).astype(np.float32)
        sd_center, sd_width = _window(sd)
        volumes.append(
            dataclasses.replace(
                image,
                magnitude=sd,
                series_description=f"{label} uncertainty (SD)",
                window_center=sd_center,
                window_width=sd_width,
                image_type=list(SD_IMAGE_TYPE),
                series_index=image.series_index + SD_SERIES_OFFSET,
                role="sd",
            )
        )
    return volumes


class ReconCancelled(RuntimeError):
    """The job was dropped or stopped between two steps (the client went away, the server stops).

    Not a failure of the method: no fallback reconstructs the scan. A RuntimeError, so that every
    connection boundary reports it (the Gadgetron gadget sends ERROR).
    """


class ServiceStopping(ReconCancelled):
    """The server shuts down: the scan stays in the journal and a restart reconstructs it."""


class TimeLimitExceeded(SamplingStopped):
    """A method ran past its time limit (``ServiceConfig.time_limit_for``); the fallback takes over."""


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


def _stop_check(
    method: str, limit_s: float | None, cancelled: Callable[[], ReconCancelled | None] | None
) -> Callable[[], None]:
    """The samplers' step check: raise the cancellation, or :class:`TimeLimitExceeded` past the limit."""
    t0 = time.monotonic()

    def check() -> None:
        if cancelled is not None:
            stop = cancelled()
            if stop is not None:
                raise stop
        if limit_s is not None and time.monotonic() - t0 > limit_s:
            raise TimeLimitExceeded(
                f"{method} stopped after {time.monotonic() - t0:.1f} s: its time limit is {limit_s:g} s"
            )

    return check


@dataclasses.dataclass
class _Job:
    scan: KSpaceScan
    method: str
    samples: int | None
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
    ) -> None:
        self.device = device
        self.fallback = fallback  # reconstructs a scan whose method failed (None: the scan fails)
        self.time_limit = time_limit or (lambda method: None)
        self._queue: queue.Queue[_Job | None] = queue.Queue(max_pending)
        self._stopping = threading.Event()
        self._busy: tuple[float, str] | None = None  # (monotonic start, method) of the running job
        self._thread = threading.Thread(target=self._run, name="recon-worker", daemon=True)
        self._thread.start()

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
    ) -> Future:
        """Queue a scan; the future resolves to its volumes (:func:`reconstruct_all`) or its exception."""
        if self._stopping.is_set():
            raise ServiceStopping("server shutting down")
        future: Future = Future()
        self._queue.put(_Job(scan, method, samples, contextvars.copy_context(), future, cancel))
        ops_metrics.QUEUE_WAITING.set(self._queue.qsize())
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
            ops_metrics.QUEUE_WAITING.set(self._queue.qsize())
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            stop = self._cancelled(job)
            if stop is not None:
                reason = "shutdown" if isinstance(stop, ServiceStopping) else "client-gone"
                ops_metrics.job_cancelled(job.method, reason)
                job.future.set_exception(stop)
                continue
            ops_metrics.QUEUE_WAIT.observe(time.monotonic() - job.submitted)
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
                    )
                )
                job.future.set_result(volumes)
            except Exception as exc:  # noqa: BLE001 - handed to the waiting connection
                if isinstance(exc, ReconCancelled):
                    reason = "shutdown" if isinstance(exc, ServiceStopping) else "client-gone"
                    ops_metrics.job_cancelled(job.method, reason)
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
                    scan, method or self.methods(scan.contrast), samples=samples, cancel=cancel
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
