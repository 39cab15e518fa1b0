"""Subcommand ``serve``: the configuration it runs with, the service start-up and the shutdown."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from recon_server.cli import options
from recon_server.cli.dicom import add_output_args, output_config
from recon_server.mrd.assemble import CALIBRATION_LINE_MODES
from recon_server.scan import ImageVolume
from recon_server.service.config import DEFAULT_PORT, AppConfig, ServiceConfig, device_unavailable
from recon_server.service.config_file import load_config

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``recon-server`` parser."""
    fmt = options.HelpFormatter
    p = subparsers.add_parser(
        "serve",
        help="run the MRD stream server (and Gadgetron listener)",
        formatter_class=fmt,
        description="Options given on the command line override the --config file; the file "
        "overrides the built-in defaults shown in parentheses. Methods: " + options.METHOD_LIST + ".",
    )
    p.add_argument(
        "--config", type=Path, default=None, help="TOML configuration file (docs/configuration.md)"
    )
    p.add_argument("--host", default=None, help="address of the MRD stream server (127.0.0.1)")
    p.add_argument(
        "--port", type=options.port, default=None, help=f"port of the MRD stream server ({DEFAULT_PORT})"
    )
    p.add_argument(
        "--gadgetron-port", type=options.port, default=None, help="also listen for Gadgetron <connect>"
    )
    p.add_argument("--gadgetron-host", default=None, help="address of the Gadgetron listener (127.0.0.1)")
    p.add_argument("--gadgetron-only", action="store_true", help="run only the Gadgetron listener")
    p.add_argument(
        "--method", default=None, help="default reconstruction method (cg-sense); one of the methods above"
    )
    p.add_argument(
        "--method-for",
        type=options.contrast_method,
        action="append",
        default=[],
        metavar="CONTRAST=METHOD",
        help="method for one contrast label (repeatable; added to the file's [recon.methods])",
    )
    p.add_argument(
        "--fallback-method",
        default=None,
        help="method that reconstructs a scan whose method failed, or 'none' (cg-sense)",
    )
    p.add_argument(
        "--calibration-lines",
        choices=CALIBRATION_LINE_MODES,
        default=None,
        help="calibration-only readouts: data as well, or calibration only (auto: data unless "
        "calibrationMode is separate)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="torch device for reconstruction (cpu); serve refuses to start on a device this host lacks",
    )
    p.add_argument("--image-dtype", choices=["float32", "uint16"], default=None, help="(float32)")
    p.add_argument("--output-dir", type=Path, default=None, help="also save each volume here (.npy)")
    p.add_argument(
        "--failed-scans-dir",
        type=Path,
        default=None,
        help="keep the raw data of scans that fail here (ISMRMRD .h5, replayable)",
    )
    _add_connection_options(p)


def _add_connection_options(p: argparse.ArgumentParser) -> None:
    """Connections, limits, model, health endpoint, logs and outputs of ``serve``."""
    p.add_argument(
        "--max-connections",
        type=options.positive_int,
        default=None,
        help="connections served at once per listener; one more is answered ERR and closed (32)",
    )
    p.add_argument(
        "--stream-deadline",
        type=options.positive_float,
        default=None,
        help="seconds a connection may take to send its whole stream (3600)",
    )
    p.add_argument(
        "--allow-client",
        action="append",
        default=None,
        metavar="CIDR",
        help="accept clients from this network only (repeatable; replaces the file's allowed_clients; "
        "default: any address)",
    )
    p.add_argument(
        "--max-scan-bytes",
        type=options.byte_size,
        default=None,
        help="k-space one stream may make the server hold, e.g. 2G (server.limits.max_scan_bytes: 4G)",
    )
    p.add_argument("--model-dir", type=Path, default=None, help="checkpoint directory of the diffusion model")
    p.add_argument("--backend", choices=["torch", "onnx"], default=None, help="denoiser backend (torch)")
    p.add_argument("--http-host", default=None, help="address of /healthz /readyz /metrics (127.0.0.1)")
    p.add_argument(
        "--http-port", type=options.port, default=None, help="port of the health/metrics endpoint (9090)"
    )
    p.add_argument("--no-http", action="store_true", help="no health/metrics endpoint")
    p.add_argument("--log-format", choices=["text", "json"], default=None, help="log line format (text)")
    add_output_args(p)
    p.set_defaults(func=cmd_serve)


def volume_npy_sink(out_dir: Path):  # type: ignore[no-untyped-def]
    """A sink saving each volume as ``<measurement or 'scan'>_<series>.npy`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def sink(volume) -> None:  # type: ignore[no-untyped-def]
        name = f"{volume.measurement_id or 'scan'}_{volume.series_index}.npy".replace("/", "_")
        np.save(out_dir / name, volume.magnitude)

    return sink


_SERVE_OVERRIDES = {
    "host": "host",
    "port": "port",
    "gadgetron_port": "gadgetron_port",
    "gadgetron_host": "gadgetron_host",
    "method": "default_method",
    "fallback_method": "fallback_method",
    "calibration_lines": "calibration_lines",
    "device": "device",
    "image_dtype": "image_dtype",
    "output_dir": "output_dir",
    "failed_scans_dir": "failed_scans_dir",
    "max_connections": "max_connections",
    "stream_deadline": "stream_deadline_s",
    "model_dir": "model_dir",
    "backend": "backend",
}


def serve_config(args: argparse.Namespace) -> AppConfig:
    """The configuration ``serve`` runs with: built-in defaults < ``--config`` file < options.

    ``--method-for`` entries are added to the file's per-contrast methods; any DICOM output
    option (``--dicom-dir``, ``--pacs``) replaces the file's whole ``[dicom]`` section.
    """
    from recon_server.recon.methods import METHODS

    app = load_config(args.config, known_methods=METHODS) if args.config is not None else AppConfig()
    changes = {
        field: getattr(args, opt) for opt, field in _SERVE_OVERRIDES.items() if getattr(args, opt) is not None
    }
    if args.method_for:
        changes["methods"] = {**app.service.methods, **dict(args.method_for)}
    if args.gadgetron_only:
        changes["gadgetron_only"] = True
    if args.allow_client is not None:
        changes["allowed_clients"] = tuple(args.allow_client)
    if args.max_scan_bytes is not None:
        changes["limits"] = dataclasses.replace(app.service.limits, max_scan_bytes=args.max_scan_bytes)
    service = dataclasses.replace(app.service, **changes)
    if changes:
        service.check_methods(METHODS)
        service.check_model(METHODS)
    ops_changes: dict[str, Any] = {}
    if args.http_host is not None:
        ops_changes["http_host"] = args.http_host
    if args.http_port is not None:
        ops_changes["http_port"] = args.http_port
    if args.no_http:
        ops_changes["http_port"] = None
    if args.log_format is not None:
        ops_changes["log_format"] = args.log_format
    dicom = app.dicom
    if args.dicom_dir is not None or args.pacs:
        dicom = output_config(args)
    return AppConfig(
        service=service, dicom=dicom, ops=dataclasses.replace(app.ops, **ops_changes), source=app.source
    )


def _timed(stage: str, sink: Callable[[ImageVolume], object]) -> Callable[[ImageVolume], None]:
    """Wrap an output sink so its time lands in the ``output:<stage>`` metric."""
    from recon_server.ops.service_metrics import ERRORS, STAGES

    def timed(volume: ImageVolume) -> None:
        try:
            with STAGES.labels(stage=f"output:{stage}").time():
                sink(volume)
        except (ValueError, OSError) as exc:
            ERRORS.labels(where=f"output:{stage}", error=type(exc).__name__).inc()
            raise

    timed.__name__ = stage
    return timed


@dataclasses.dataclass
class _Outputs:
    """The service's output sinks and what the DICOM side left from an earlier run."""

    sinks: list[Callable[[ImageVolume], None]]
    sender: Any = None  # dicom.deliver.SenderWorker when there are PACS destinations
    spool: Any = None  # dicom.spool.Spool likewise
    reconciled: set[str] = dataclasses.field(default_factory=set)  # journal tags the PACS has


def _outputs(app: AppConfig) -> _Outputs:
    """The .npy and DICOM sinks; the DICOM spool reconciled before anything new is written."""
    from recon_server.dicom.deliver import SenderWorker, store_series
    from recon_server.dicom.spool import Spool

    config, dicom = app.service, app.dicom
    out = _Outputs(sinks=[_timed("npy", volume_npy_sink(config.output_dir))] if config.output_dir else [])
    if dicom is None:
        return out
    if dicom.destinations:
        out.spool = Spool(dicom.spool_dir)
        report = out.spool.reconcile()  # before anything new is written (docs/dicom.md)
        out.reconciled = report.delivered_tags
        if report.respooled or report.dropped:
            log.warning(
                "DICOM spool after a restart: %d series spooled again (%d images), %d unfinished "
                "series left to the journal",
                report.respooled,
                report.images,
                report.dropped,
            )
        out.sender = SenderWorker(dicom).start()
    out.sinks.append(_timed("dicom", functools.partial(store_series, config=dicom, worker=out.sender)))
    print(f"recon-server: DICOM series -> {dicom.output_dir}", flush=True)
    return out


def _start_listeners(config: ServiceConfig, outputs: _Outputs, worker: Any, journal: Any) -> list[Any]:
    """The MRD stream server (unless Gadgetron only) and the Gadgetron listener (if a port is set)."""
    from recon_server.service.gadget import GadgetronListener
    from recon_server.service.server import StreamServer

    started: list[Any] = []
    if not config.gadgetron_only:
        server = StreamServer(config, sinks=outputs.sinks, worker=worker, journal=journal)
        host, port = server.start()
        started.append(server)
        print(f"recon-server: MRD stream server on {host}:{port}", flush=True)
    if config.gadgetron_port is not None:
        listener = GadgetronListener(config, sinks=outputs.sinks, worker=worker)
        host, port = listener.start()
        started.append(listener)
        print(f"recon-server: Gadgetron <connect> listener on {host}:{port}", flush=True)
    return started


def cmd_serve(args: argparse.Namespace) -> int:
    from recon_server.cli.runtime import start_ops, watch_listeners
    from recon_server.ops.http import queue_ready
    from recon_server.ops.logs import configure_logging
    from recon_server.service.journal import Journal
    from recon_server.service.server import StreamServer
    from recon_server.service.worker import worker_for

    app = serve_config(args)
    config = app.service
    problem = device_unavailable(config.device)
    if problem is not None:
        # One line, no traceback, before any port opens: a server that would fail every scan.
        print(
            f"recon-server serve: error: device {config.device!r}: {problem}; use --device cpu",
            file=sys.stderr,
            flush=True,
        )
        return 2
    # `recon-server --log-level` beats [ops] log_level unless left at its default (INFO).
    configure_logging(app.ops.log_format, args.log_level if args.log_level != "INFO" else app.ops.log_level)
    if app.source is not None:
        log.info("configuration %s", app.source)
    done = threading.Event()
    # Set at once, so that a SIGTERM during the start (model load, recovery) is not lost.
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    outputs = _outputs(app)
    journal = None
    if config.journal_dir is not None:
        journal = Journal(
            config.journal_dir,
            failed_dir=config.failed_scans_dir,
            on_release=outputs.spool.release if outputs.spool is not None else None,
        )
    worker = worker_for(config)
    ops_server, loader, stop_ops = start_ops(app, worker=worker, sender=outputs.sender)
    if ops_server is not None:
        ops_server.checks["recon_queue"] = queue_ready(worker, config.ready_queue_threshold)
        if ops_server.address is not None:
            host, port = ops_server.address
            print(f"recon-server: health and metrics on http://{host}:{port}", flush=True)
    endpoints = _start_listeners(config, outputs, worker, journal)
    if ops_server is not None:
        watch_listeners(ops_server, endpoints)
    server = next((e for e in endpoints if isinstance(e, StreamServer)), None)
    if journal is not None and server is not None:
        recovery = threading.Thread(
            target=server.recover, args=(outputs.reconciled,), name="journal-recovery", daemon=True
        )
        recovery.start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    return _shutdown(
        config, worker=worker, endpoints=endpoints, sender=outputs.sender, loader=loader, stop_ops=stop_ops
    )


def _shutdown(
    config: ServiceConfig,
    *,
    worker: Any,
    endpoints: list[Any],
    sender: Any,
    loader: Any,
    stop_ops: Callable[[], None],
) -> int:
    """SIGTERM: stop accepting, let running scans finish or leave them to the journal (clients get
    ``ERR server shutting down`` + CLOSE), stop the worker, drain the spool for a bounded time, exit 0.

    The worker thread is joined before the interpreter exits: torch's threads still running at
    exit aborted the process (``terminate called without an active exception``).
    """
    log.info("shutting down: no new connections; running scans get %.0f s", config.shutdown_grace_s)
    from recon_server.service.server import StreamServer

    servers = [e for e in endpoints if isinstance(e, StreamServer)]
    for endpoint in endpoints:
        if endpoint not in servers:
            endpoint.stop()  # the Gadgetron listener: stop accepting
    for server in servers:
        server.shutdown(config.shutdown_grace_s)
    if not worker.stop(config.shutdown_grace_s + 10.0):
        log.error("the reconstruction worker did not stop; exiting without it")
        stop_ops()
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)
    if sender is not None:
        left = sender.drain_and_stop(config.shutdown_drain_s)
        if left:
            log.warning("%d image(s) stay in the DICOM spool; they are sent after the restart", left)
    loader.wait(10.0)  # a model still loading runs torch too
    stop_ops()
    log.info("stopped")
    return 0
