"""What ``recon-server serve`` runs beside the listeners: health checks, scrape-time metrics and
the model pre-load.

Readiness checks (``/readyz``):

``recon_worker``   the reconstruction worker thread is alive
``dicom_sender``   the C-STORE worker thread is alive (when destinations are configured)
``model``          the configured model loaded on its backend (torch checkpoint verified by
                   sha256, or the ONNX session created); "loading" counts as not ready
``dicom_output`` / ``dicom_spool``   the DICOM output and spool folders are writable

Scrape-time gauges: spool depth, oldest pending image age and quarantined images per
destination; GPU memory per CUDA device (``torch.cuda``), when CUDA is available.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from recon_server import __version__
from recon_server.ops import service_metrics as metrics
from recon_server.ops.http import Check, OpsServer, spool_writable, thread_alive
from recon_server.ops.service_metrics import REGISTRY, Sample, SampleCollector
from recon_server.service.config import AppConfig
from recon_server.service.endpoint import Endpoint
from recon_server.service.listener import liveness as listener_liveness
from recon_server.service.server import StreamServer
from recon_server.service.worker import ReconWorker

log = logging.getLogger(__name__)

SPOOL_HELP = {
    "recon_server_spool_pending_images": "Images waiting in the DICOM spool, per destination.",
    "recon_server_spool_oldest_age_seconds": "Age of the oldest pending image, per destination (0: none).",
    "recon_server_spool_quarantined_images": "Images quarantined after a permanent refusal, per destination.",
}
GPU_HELP = {
    "recon_server_gpu_memory_allocated_bytes": "torch.cuda.memory_allocated per device.",
    "recon_server_gpu_memory_reserved_bytes": "torch.cuda.memory_reserved (caching allocator) per device.",
    "recon_server_gpu_memory_peak_bytes": "torch.cuda.max_memory_allocated per device.",
    "recon_server_gpu_memory_total_bytes": "Total memory of each CUDA device.",
}


def spool_samples(spool_dir: Path, destinations: Iterable[str]) -> list[Sample]:
    """Pending count, oldest pending age and quarantined count of each destination."""
    from recon_server.dicom.spool import Spool

    out: list[Sample] = []
    if not spool_dir.is_dir():
        return out
    spool = Spool(spool_dir)
    now_ns = time.time_ns()
    for name in destinations:
        batches = spool.pending(name)
        pending = sum(len(b.items) for b in batches)
        oldest = min((b.oldest_mtime_ns for b in batches), default=now_ns)
        labels = {"destination": name}
        out.append(Sample("recon_server_spool_pending_images", labels, pending))
        out.append(Sample("recon_server_spool_oldest_age_seconds", labels, max(0.0, (now_ns - oldest) / 1e9)))
        out.append(Sample("recon_server_spool_quarantined_images", labels, len(spool.quarantined(name))))
    return out


def gpu_samples() -> list[Sample]:
    """Memory of every visible CUDA device (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        labels = {"device": f"cuda:{i}"}
        out.append(Sample("recon_server_gpu_memory_allocated_bytes", labels, torch.cuda.memory_allocated(i)))
        out.append(Sample("recon_server_gpu_memory_reserved_bytes", labels, torch.cuda.memory_reserved(i)))
        out.append(Sample("recon_server_gpu_memory_peak_bytes", labels, torch.cuda.max_memory_allocated(i)))
        total = torch.cuda.get_device_properties(i).total_memory
        out.append(Sample("recon_server_gpu_memory_total_bytes", labels, total))
    return out


class ModelLoader:
    """Loads the configured model in a background thread so liveness answers at once."""

    def __init__(self, app: AppConfig, on_denoiser: Callable[[Any], None] | None = None) -> None:
        self.app = app
        self.on_denoiser = on_denoiser  # takes an injected (ONNX Runtime) denoiser once loaded
        self.state = "not configured"
        self.ok = app.service.model_dir is None
        self.denoiser: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> ModelLoader:
        if self.app.service.model_dir is not None:
            self.state = "loading"
            self._thread = threading.Thread(target=self._load, name="model-load", daemon=True)
            self._thread.start()
        else:
            metrics.INFO.labels(version=__version__, backend=self.app.service.backend, provider="none").set(1)
        return self

    def _load(self) -> None:
        from recon_server.dpm.onnx import OnnxDenoiser, load_denoiser
        from recon_server.recon.engine import load_model

        s = self.app.service
        t0 = time.perf_counter()
        try:
            if s.backend == "onnx":
                self.denoiser = load_denoiser(
                    s.model_dir,  # type: ignore[arg-type]
                    backend="onnx",
                    device=s.device,
                    onnx_file=s.resolved_onnx_file,
                    providers=s.onnx_providers or None,
                )
                # The no-backprop samplers run on the injected ONNX Runtime denoiser.
                if self.on_denoiser is not None:
                    self.on_denoiser(self.denoiser)
            else:
                # Warms the engine's model cache: the first scan does not pay the load.
                self.denoiser, _ = load_model(s.model_dir, s.device)  # type: ignore[arg-type]
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            self.state = f"failed: {type(exc).__name__}: {exc}"
            log.error("model %s did not load: %s", s.model_dir, exc)
            return
        provider = self.denoiser.provider if isinstance(self.denoiser, OnnxDenoiser) else f"torch:{s.device}"
        metrics.INFO.labels(version=__version__, backend=s.backend, provider=provider).set(1)
        self.state = f"loaded {s.model_dir} on {provider} in {time.perf_counter() - t0:.1f} s"
        self.ok = True
        log.info("model %s", self.state)

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def check(self) -> tuple[bool, str]:
        return self.ok, self.state


def readiness_checks(
    app: AppConfig, *, worker: object, sender: object | None, model: ModelLoader
) -> dict[str, Check]:
    """The checks listed in the module docstring for this configuration."""

    def worker_alive() -> bool:
        return bool(getattr(worker, "alive", True))

    checks: dict[str, Check] = {
        "recon_worker": thread_alive("reconstruction worker", worker_alive),
        "model": model.check,
    }
    if sender is not None:
        checks["dicom_sender"] = thread_alive("DICOM sender", lambda: bool(getattr(sender, "alive", False)))
    if app.dicom is not None:
        checks["dicom_output"] = spool_writable(app.dicom.output_dir)
        checks["dicom_spool"] = spool_writable(app.dicom.spool_dir)
    return checks


def start_ops(
    app: AppConfig,
    *,
    worker: ReconWorker,
    sender: object | None = None,
) -> tuple[OpsServer | None, ModelLoader, Callable[[], None]]:
    """Start the model pre-load, register collectors and (unless disabled) the HTTP endpoint.

    Returns ``(server or None, loader, stop)``; :func:`watch_listeners` adds the listeners'
    checks once they run.
    """
    model = ModelLoader(app, worker.use_denoiser).start()
    if app.dicom is not None and app.dicom.destinations:
        dicom = app.dicom
        names = [d.name for d in dicom.destinations]
        REGISTRY.add_collector(
            "spool", SampleCollector(SPOOL_HELP, lambda: spool_samples(dicom.spool_dir, names))
        )
    REGISTRY.add_collector("gpu", SampleCollector(GPU_HELP, gpu_samples))
    if app.ops.http_port is None:
        return None, model, lambda: None
    server = OpsServer(
        app.ops.http_host,
        app.ops.http_port,
        checks=readiness_checks(app, worker=worker, sender=sender, model=model),
    )
    server.start()
    return server, model, server.stop


def watch_listeners(ops_server: OpsServer, endpoints: Sequence[Endpoint]) -> None:
    """``/healthz`` fails once an accept loop of ``endpoints`` dies; ``/readyz`` fails while the
    MRD stream server shuts down."""
    loops = [e.accept_loop for e in endpoints]
    ops_server.liveness["accept_loops"] = lambda: listener_liveness(loops)
    for endpoint in endpoints:
        if isinstance(endpoint, StreamServer):
            ops_server.checks["accepting"] = _accepting(endpoint)


def _accepting(server: StreamServer) -> Check:
    def check() -> tuple[bool, str]:
        down = server.shutting_down
        return not down, "shutting down" if down else "accepting streams"

    return check
