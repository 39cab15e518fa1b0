"""Subcommands ``replay`` (stream a raw file to a server) and ``recon`` (reconstruct a raw file here).

Both print progress on stderr (``--no-progress``: none): ``recon`` one line per slice
(``recon-server recon: FLAIR dps-fast: slice 3/16, 12.0 s elapsed, 4.00 s/slice``; one updating
line on a terminal), ``replay`` the server's progress lines (``recon-server replay: server: ...``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np

from recon_server.cli import options
from recon_server.cli.dicom import add_output_args, output_config
from recon_server.mrd.assemble import CALIBRATION_LINE_MODES
from recon_server.service.config import DEFAULT_PORT, ServiceConfig

if TYPE_CHECKING:
    from recon_server.recon.methods import DiffusionSettings
    from recon_server.recon.pipeline import Progress

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``replay`` and ``recon`` to the ``recon-server`` parser."""
    fmt = options.HelpFormatter
    p = subparsers.add_parser(
        "replay",
        help="stream an ISMRMRD raw file to a server",
        description="Stream an ISMRMRD raw file to a running `recon-server serve` (its MRD stream "
        "server, --host/--port) and save the images it sends back.",
        formatter_class=fmt,
    )
    p.add_argument("file", type=Path, help="ISMRMRD raw file (.h5)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address of the MRD stream server (`recon-server serve --host`)"
    )
    p.add_argument(
        "--port",
        type=options.port,
        default=DEFAULT_PORT,
        help="port of the MRD stream server (`recon-server serve --port`)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for images_<series>.npy (one per series), images.npy (one size) and images.h5",
    )
    p.add_argument(
        "--method",
        default=None,
        help=f"ask the server for this method, one of {options.METHOD_LIST} "
        "(default: the server's method for the scan's contrast)",
    )
    p.add_argument(
        "--samples",
        type=options.posterior_samples,
        default=None,
        help="ask for posterior samples (mean + SD map, sd.npy; default: the server's, one)",
    )
    p.add_argument("--config-name", default="default", help="CONFIG_FILE name sent first")
    p.add_argument(
        "--no-progress", action="store_true", help="no send bar, no server progress lines on stderr"
    )
    p.set_defaults(func=cmd_replay)
    _add_recon(subparsers, fmt)


def _add_recon(subparsers: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    p = subparsers.add_parser(
        "recon", help="reconstruct an ISMRMRD raw file without a server", formatter_class=fmt
    )
    p.add_argument("file", type=Path, help="ISMRMRD raw file (.h5)")
    p.add_argument("--out", type=Path, required=True, help="folder for images.npy and images.h5")
    p.add_argument("--method", default=None, help=f"one of {options.METHOD_LIST} (default: cg-sense)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="checkpoint of the diffusion methods (default: $RECON_SERVER_MODEL_DIR, else the shipped model)",
    )
    p.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default="torch",
        help="denoiser backend of the no-backprop diffusion methods (onnx: MODEL_DIR/denoiser.onnx)",
    )
    p.add_argument(
        "--samples",
        type=options.posterior_samples,
        default=None,
        help="posterior samples of a diffusion method: mean image + SD map (sd.npy, a second series; "
        "default: one, no SD map)",
    )
    options.add_sampler_overrides(p)
    p.add_argument(
        "--cpu-precision",
        choices=options.CPU_PRECISIONS,
        default="auto",
        help="CPU arithmetic of the network (auto: the fastest measured on this machine)",
    )
    p.add_argument(
        "--onnx-file",
        type=Path,
        default=None,
        help="ONNX file for --backend onnx (default: MODEL_DIR/denoiser.onnx)",
    )
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
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_recon)


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
        print(f"recon-server replay: {exc}", file=sys.stderr, flush=True)
        return 1
    except ReplayError as exc:
        print(f"recon-server replay: server error: {exc}", file=sys.stderr, flush=True)
        return 1
    names = ", ".join(p.name for p in result.files)
    print(f"recon-server replay: {len(result.images)} images -> {args.out} ({names})")
    return 0


def _diffusion_settings(args: argparse.Namespace) -> DiffusionSettings:
    """The diffusion methods' model: ``--model-dir`` and, for ``--backend onnx``, the ONNX Runtime
    denoiser (the samplers without backprop run on it; ``dps`` refuses it)."""
    from recon_server.dpm.onnx import load_denoiser
    from recon_server.recon.methods import DiffusionSettings

    if args.backend == "onnx" and args.model_dir is None:
        raise ValueError("--backend onnx needs --model-dir (its card names the contrast slots)")
    denoiser = None
    if args.backend == "onnx":
        denoiser = load_denoiser(args.model_dir, backend="onnx", device=args.device, onnx_file=args.onnx_file)
    return DiffusionSettings(
        model_dir=args.model_dir,
        denoiser=denoiser,
        device=args.device,
        cpu_precision=args.cpu_precision,
        overrides=options.method_overrides(args.overrides),
    )


class ProgressLine:
    """A progress sink for ``recon_server.recon.pipeline.reconstruct_all``: each
    ``Progress.text()`` on stderr as ``recon-server COMMAND: <text>``, one line per update, or
    one line rewritten in place when stderr is a terminal."""

    def __init__(self, command: str, stream: TextIO | None = None) -> None:
        self.command = command
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0  # of the line being rewritten (terminal only)

    def __call__(self, progress: Progress) -> None:
        text = f"recon-server {self.command}: {progress.text()}"
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
            if progress.done >= progress.total:
                self.close()
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the line being rewritten (terminal), so what follows starts on its own line."""
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
        self._width = 0


def cmd_recon(args: argparse.Namespace) -> int:
    from recon_server.dicom.deliver import store_series
    from recon_server.dicom.sender import PacsSender
    from recon_server.mrd import ismrmrd_io
    from recon_server.mrd.assemble import Assembler
    from recon_server.mrd.replay import to_ismrmrd_images
    from recon_server.recon.pipeline import reconstruct_all
    from recon_server.service.stream import volume_to_images

    config = ServiceConfig(device=args.device)
    diffusion = _diffusion_settings(args)
    raw = ismrmrd_io.read_raw(args.file)
    asm = Assembler(
        raw.header_xml,
        config={"contrast": args.contrast} if args.contrast else None,
        calibration_lines=args.calibration_lines,
    )
    for head, data in zip(raw.acquisition_headers, raw.data, strict=True):
        asm.add_line(head, data)
    progress = None if args.no_progress else ProgressLine("recon")
    try:
        volumes = [
            volume
            for scan in asm.finish()
            for volume in reconstruct_all(
                scan,
                method=config.method_for(scan.contrast, args.method),
                device=config.device,
                samples=args.samples,
                diffusion=diffusion,
                progress=progress,
            )
        ]
    finally:
        if progress is not None:
            progress.close()
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
