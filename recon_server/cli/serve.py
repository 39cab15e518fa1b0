"""Subcommands ``serve``, ``replay`` and ``recon`` (registered into ``recon-server``)."""

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
from recon_server.service.config import (
    DEFAULT_PORT,
    MAX_POSTERIOR_SAMPLES,
    AppConfig,
    ServiceConfig,
    device_unavailable,
    load_config,
)

log = logging.getLogger(__name__)


def _samples(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_POSTERIOR_SAMPLES:
        raise argparse.ArgumentTypeError(f"samples must be in 1..{MAX_POSTERIOR_SAMPLES}, got {value}")
    return value


def _size(text: str) -> int:
    """Bytes: an integer, or with a K / M / G / T suffix (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    body = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = units.get(body[-1:], 1)
    try:
        value = int(float(body[:-1] if scale > 1 else body) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes such as 4G or 4294967296, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _contrast_method(text: str) -> tuple[str, str]:
    contrast, sep, method = text.partition("=")
    if not sep or not contrast or not method:
        raise argparse.ArgumentTypeError(f"expected CONTRAST=METHOD, got {text!r}")
    return contrast.strip().upper(), method.strip()


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``recon-server`` parser."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser(
        "serve",
        help="run the MRD stream server (and Gadgetron listener)",
        formatter_class=fmt,
        description="Options given on the command line override the --config file; the file "
        "overrides the built-in defaults shown here as 'default: None (X)'.",
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
    p.add_argument("--method", default=None, help="default reconstruction method (cg-sense)")
    p.add_argument(
        "--method-for",
        type=_contrast_method,
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
        type=_size,
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

    p = subparsers.add_parser("replay", help="stream an ISMRMRD raw file to a server", formatter_class=fmt)
    p.add_argument("file", type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=options.port, default=DEFAULT_PORT)
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for images_<series>.npy (one per series), images.npy (one size) and images.h5",
    )
    p.add_argument("--method", default=None, help="ask the server for this method")
    p.add_argument(
        "--samples", type=_samples, default=None, help="ask for posterior samples (mean + SD map, sd.npy)"
    )
    p.add_argument("--config-name", default="default", help="CONFIG_FILE name sent first")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_replay)

    p = subparsers.add_parser(
        "recon", help="reconstruct an ISMRMRD raw file without a server", formatter_class=fmt
    )
    p.add_argument("file", type=Path)
    p.add_argument("--out", type=Path, required=True, help="folder for images.npy and images.h5")
    p.add_argument("--method", default=None, help="method (default: per contrast, cg-sense)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-dir", type=Path, default=None, help="checkpoint of the diffusion methods")
    p.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default="torch",
        help="denoiser backend of the no-backprop diffusion methods (onnx: MODEL_DIR/denoiser.onnx)",
    )
    p.add_argument(
        "--samples",
        type=_samples,
        default=None,
        help="posterior samples of a diffusion method: mean image + SD map (sd.npy, a second series)",
    )
    p.add_argument("--onnx-file", type=Path, default=None, help="ONNX file for --backend onnx")
    p.add_argument(
        "--contrast", default=None, help="contrast label (FLAIR, T1, ...) when the header names none"
    )
    p.add_argument(
        "--calibration-lines",
        choices=CALIBRATION_LINE_MODES,
        default="auto",
        help="calibration-only lines: data as well (auto: unless calibrationMode is separate), "
        "or calibration only (the pure imaging grid)",
    )
    add_output_args(p)
    p.add_argument("--send-timeout", type=float, default=60.0, help="seconds to try sending to the PACS")
    p.set_defaults(func=cmd_recon)


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
            with STAGES.time(stage=f"output:{stage}"):
                sink(volume)
        except (ValueError, OSError) as exc:
            ERRORS.inc(where=f"output:{stage}", error=type(exc).__name__)
            raise

    timed.__name__ = stage
    return timed


def cmd_serve(args: argparse.Namespace) -> int:
    from recon_server.cli.runtime import start_ops
    from recon_server.dicom.deliver import SenderWorker, store_series
    from recon_server.dicom.spool import Spool
    from recon_server.ops.http import queue_ready
    from recon_server.ops.logs import configure_logging
    from recon_server.recon.pipeline import ReconWorker
    from recon_server.service.gadget import GadgetronListener
    from recon_server.service.journal import Journal
    from recon_server.service.server import StreamServer

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
    sinks = [_timed("npy", volume_npy_sink(config.output_dir))] if config.output_dir else []
    dicom = app.dicom
    sender = None
    spool = None
    reconciled: set[str] = set()
    if dicom is not None:
        if dicom.destinations:
            spool = Spool(dicom.spool_dir)
            report = spool.reconcile()  # before anything new is written (docs/dicom.md)
            reconciled = report.delivered_tags
            if report.respooled or report.dropped:
                log.warning(
                    "DICOM spool after a restart: %d series spooled again (%d images), %d unfinished "
                    "series left to the journal",
                    report.respooled,
                    report.images,
                    report.dropped,
                )
        sender = SenderWorker(dicom).start() if dicom.destinations else None
        sinks.append(_timed("dicom", functools.partial(store_series, config=dicom, worker=sender)))
        print(f"recon-server: DICOM series -> {dicom.output_dir}", flush=True)
    journal = None
    if config.journal_dir is not None:
        journal = Journal(
            config.journal_dir,
            failed_dir=config.failed_scans_dir,
            on_release=spool.release if spool is not None else None,
        )
    worker = ReconWorker(
        device=config.device,
        max_pending=config.max_pending_scans,
        fallback=config.fallback_method,
        time_limit=config.time_limit_for,
    )
    ops_server, loader, stop_ops = start_ops(app, worker=worker, sender=sender)
    if ops_server is not None:
        ops_server.checks["recon_queue"] = queue_ready(worker, config.ready_queue_threshold)
        if ops_server.address is not None:
            host, port = ops_server.address
            print(f"recon-server: health and metrics on http://{host}:{port}", flush=True)
    server = listener = None
    if not config.gadgetron_only:
        server = StreamServer(config, sinks=sinks, worker=worker, journal=journal)
        host, port = server.start()
        print(f"recon-server: MRD stream server on {host}:{port}", flush=True)
        if ops_server is not None:
            accepting = server

            def accepting_check() -> tuple[bool, str]:
                down = accepting.shutting_down
                return not down, "shutting down" if down else "accepting streams"

            ops_server.checks["accepting"] = accepting_check
    if config.gadgetron_port is not None:
        listener = GadgetronListener(config, sinks=sinks, worker=worker)
        host, port = listener.start()
        print(f"recon-server: Gadgetron <connect> listener on {host}:{port}", flush=True)
    recovery = None
    if journal is not None and server is not None:
        recovery = threading.Thread(
            target=server.recover, args=(reconciled,), name="journal-recovery", daemon=True
        )
        recovery.start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    return _shutdown(
        config,
        worker=worker,
        server=server,
        listener=listener,
        sender=sender,
        loader=loader,
        stop_ops=stop_ops,
    )


def _shutdown(
    config: ServiceConfig,
    *,
    worker: Any,
    server: Any,
    listener: Any,
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
    if listener is not None:
        listener.stop()
    if server is not None:
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


def cmd_replay(args: argparse.Namespace) -> int:
    from recon_server.mrd.replay import NoImagesError, ReplayError, replay_file

    try:
        result = replay_file(
            args.file,
            host=args.host,
            port=args.port,
            out_dir=args.out,
            method=args.method,
            samples=args.samples,
            config_name=args.config_name,
            progress=not args.no_progress,
        )
    except NoImagesError as exc:  # a clean CLOSE without images: not a server error
        print(f"recon-server replay: {exc}")
        log.error("%s", exc)
        return 1
    except ReplayError as exc:
        print(f"recon-server replay: server error: {exc}")
        log.error("server error: %s", exc)
        return 1
    names = ", ".join(p.name for p in result.files)
    print(f"recon-server replay: {len(result.images)} images -> {args.out} ({names})")
    return 0


def _configure_model(args: argparse.Namespace) -> None:
    """Point the diffusion methods at ``--model-dir`` and, for ``--backend onnx``, inject the
    ONNX Runtime denoiser (the samplers without backprop run on it; ``dps`` refuses it)."""
    from recon_server.dpm.onnx import load_denoiser
    from recon_server.recon.methods import configure_diffusion

    if args.backend == "onnx" and args.model_dir is None:
        raise ValueError("--backend onnx needs --model-dir (its card names the contrast slots)")
    if args.model_dir is not None:
        configure_diffusion(model_dir=args.model_dir)
    if args.backend == "onnx":
        denoiser = load_denoiser(args.model_dir, backend="onnx", device=args.device, onnx_file=args.onnx_file)
        configure_diffusion(denoiser=denoiser)


def cmd_recon(args: argparse.Namespace) -> int:
    from recon_server.dicom.deliver import store_series
    from recon_server.dicom.sender import PacsSender
    from recon_server.mrd import ismrmrd_io
    from recon_server.mrd.assemble import Assembler
    from recon_server.mrd.replay import to_ismrmrd_images
    from recon_server.recon.pipeline import reconstruct_all
    from recon_server.service.server import volume_to_images

    config = ServiceConfig(device=args.device)
    _configure_model(args)
    raw = ismrmrd_io.read_raw(args.file)
    asm = Assembler(
        raw.header_xml,
        config={"contrast": args.contrast} if args.contrast else None,
        calibration_lines=args.calibration_lines,
    )
    for head, data in zip(raw.acquisition_headers, raw.data, strict=True):
        asm.add_line(head, data)
    volumes = [
        volume
        for scan in asm.finish()
        for volume in reconstruct_all(
            scan,
            method=config.method_for(scan.contrast, args.method),
            device=config.device,
            samples=args.samples,
        )
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stacked = np.concatenate([v.magnitude for v in volumes if v.role == "image"]).astype(np.float32)
    np.save(args.out / "images.npy", stacked)
    sd_maps = [v.magnitude for v in volumes if v.role == "sd"]
    if sd_maps:
        np.save(args.out / "sd.npy", np.concatenate(sd_maps).astype(np.float32))
    h5 = args.out / "images.h5"
    h5.unlink(missing_ok=True)
    images = [im for v in volumes for im in volume_to_images(v)]
    ismrmrd_io.write_images(h5, to_ismrmrd_images(images))
    for v in volumes:
        print(f"recon-server recon: {v.series_description}: {v.magnitude.shape} ({v.provenance.settings})")
    if args.dicom_dir is None:
        args.dicom_dir = args.out / "dicom"
    dicom = output_config(args)
    if dicom is not None:
        for v in volumes:
            paths = store_series(v, dicom)
            print(f"recon-server recon: {len(paths)} DICOM files -> {paths[0].parent}")
        if dicom.destinations:
            report = PacsSender(dicom).drain(timeout_s=args.send_timeout)
            print(
                f"recon-server recon: PACS: stored {report.stored}, quarantined {report.quarantined}, "
                f"pending {report.pending} (pending images stay in {dicom.spool_dir})"
            )
            if report.pending or report.quarantined:
                return 1
    print(f"recon-server recon: {stacked.shape[0]} images -> {args.out / 'images.npy'}")
    return 0
