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

:class:`recon_server.service.worker.ReconWorker` serialises all reconstructions of the service
through one queue and thread (one GPU).

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

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from recon_server import __version__
from recon_server.ops import service_metrics
from recon_server.recon import classic, coils, noise
from recon_server.recon.dps import SamplingStopped, stop_check
from recon_server.recon.methods import (
    DiffusionSettings,
    MethodOutput,
    ReconProblem,
    get_method,
    run_method,
)
from recon_server.scan import ImageVolume, KSpaceScan, Provenance

log = logging.getLogger(__name__)

MAX_CALIBRATION_ROWS = 24
TARGET_P99 = 1000.0
SD_SERIES_OFFSET = 500
SD_IMAGE_TYPE = ["DERIVED", "SECONDARY", "OTHER", "SD"]


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


@dataclasses.dataclass(frozen=True)
class Progress:
    """How far one scan's reconstruction is: ``done`` of ``total`` slices (x posterior samples)."""

    label: str  # protocol name or contrast
    method: str
    done: int
    total: int
    elapsed_s: float

    def text(self) -> str:
        """One line, e.g. ``FLAIR dps-fast: slice 3/16, 12.0 s elapsed, 4.00 s/slice``."""
        per = self.elapsed_s / max(self.done, 1)
        return (
            f"{self.label} {self.method}: slice {self.done}/{self.total}, "
            f"{self.elapsed_s:.1f} s elapsed, {per:.2f} s/slice"
        )


ProgressSink = Callable[[Progress], None]


def reconstruct(
    scan: KSpaceScan,
    *,
    method: str,
    device: str | torch.device = "cpu",
    diffusion: DiffusionSettings | None = None,
) -> ImageVolume:
    """Reconstruct one assembled scan with the named method (see the module docstring)."""
    return reconstruct_all(scan, method=method, device=device, diffusion=diffusion)[0]


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
    diffusion: DiffusionSettings | None = None,
    progress: ProgressSink | None = None,
) -> list[ImageVolume]:
    """The image volume, plus its SD-map volume when ``samples`` > 1 posterior samples were drawn.

    ``diffusion``: the diffusion methods' settings (model, seed, overrides; None: defaults);
    ``samples=None`` uses its number of posterior samples. ``progress`` receives a
    :class:`Progress` as slices are done.
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
            return _reconstruct_all(scan, method, device, samples, diffusion, progress)
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
                volumes = _reconstruct_all(scan, fallback, fallback_device, samples, diffusion, progress)
        except FALLBACK_ERRORS as exc2:
            if isinstance(exc2, ReconCancelled):
                raise
            raise FallbackFailed(
                f"method {method} failed ({reason}); the fallback {fallback} failed too: "
                f"{type(exc2).__name__}: {' '.join(str(exc2).split())}"
            ) from exc2
    service_metrics.fallback_used(method, fallback, reason_class)
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


def series_label(scan: KSpaceScan) -> str:
    """What the scan's series is called: its protocol name, else its contrast, else ``MR``."""
    return scan.header.protocol_name or scan.contrast or "MR"


def _progress_fn(
    scan: KSpaceScan, method: str, progress: ProgressSink | None
) -> Callable[[int, int], None] | None:
    """The methods' ``progress(done, total)`` as :class:`Progress` for ``progress``."""
    if progress is None:
        return None
    label = series_label(scan)
    t0 = time.perf_counter()

    def report(done: int, total: int) -> None:
        try:
            progress(Progress(label, method, done, total, time.perf_counter() - t0))
        except Exception as exc:  # noqa: BLE001 - a progress display must not fail the reconstruction
            log.debug("progress not reported: %s", exc)

    return report


def _reconstruct_all(
    scan: KSpaceScan,
    method: str,
    device: str | torch.device,
    samples: int | None,
    diffusion: DiffusionSettings | None,
    progress: ProgressSink | None,
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
        out = run_method(
            method,
            recon_problem(scan, kspace, maps, whitened=whitened),
            samples=samples,
            diffusion=diffusion,
            progress=_progress_fn(scan, method, progress),
        )
    settings["seconds_method"] = round(time.perf_counter() - t2, 3)
    settings["seconds_prewhiten"] = round(t1 - t0, 3)
    settings["seconds_coils"] = round(t2 - t1, 3)
    return _volumes(scan, method, out, settings, started=t0)


def _volumes(
    scan: KSpaceScan, method: str, out: MethodOutput, settings: dict[str, object], *, started: float
) -> list[ImageVolume]:
    """The image volume (and SD map) from a method's output: magnitude scaled, window, provenance."""
    settings.update(out.settings)
    magnitude = out.image.abs().to(torch.float32).cpu().numpy()
    p99 = float(np.percentile(magnitude, 99.0)) if magnitude.size else 0.0
    scale = TARGET_P99 / p99 if p99 > 0 else 1.0
    magnitude = (magnitude * scale).astype(np.float32)
    settings["intensity_scale"] = scale
    settings["seconds"] = round(time.perf_counter() - started, 3)
    label = series_label(scan)
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
        scan_header=scan.header,
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


class TimeLimitExceeded(SamplingStopped):
    """A method ran past its time limit (``ServiceConfig.time_limit_for``); the fallback takes over."""


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
