"""Subcommands ``config check FILE`` and ``export-onnx`` (registered into ``recon-server``).

``recon-server config check FILE`` exits 0 and prints a summary when the file is valid, and
2 with ``FILE: field.name: problem`` on stderr otherwise (the same check ``serve --config``
runs at start). ``recon-server export-onnx --model DIR --out FILE`` writes the model's
preconditioned denoiser as ONNX (see :mod:`recon_server.dpm.onnx`) and checks that ONNX Runtime
reproduces the torch output on a random batch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from recon_server.cli import options

log = logging.getLogger(__name__)

# Relative error allowed between ONNX Runtime and torch in float32 (the equivalence tests use
# the same bound across batch and matrix sizes).
EXPORT_TOLERANCE = 1e-3


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``recon-server`` parser."""
    fmt = options.HelpFormatter
    p = subparsers.add_parser("config", help="check a configuration file", formatter_class=fmt)
    sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = sub.add_parser("check", help="validate FILE and print a summary (exit 0) or the bad field (2)")
    c.add_argument("file", type=Path, help="TOML configuration (docs/configuration.md)")
    c.set_defaults(func=cmd_config_check)

    p = subparsers.add_parser(
        "export-onnx", help="export a model's denoiser to ONNX (for backend onnx)", formatter_class=fmt
    )
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (card.json + weights)")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write (e.g. MODEL/denoiser.onnx)")
    p.add_argument(
        "--exporter",
        choices=["dynamo", "torchscript"],
        default="dynamo",
        help="torch.export-based exporter, or the older (deprecated, faster) TorchScript tracer",
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    p.add_argument(
        "--check-size", type=int, default=48, help="matrix size of the torch-vs-ORT check (0: skip)"
    )
    p.set_defaults(func=cmd_export_onnx)


def cmd_config_check(args: argparse.Namespace) -> int:
    from recon_server.recon.methods import METHODS
    from recon_server.service.config import ConfigError
    from recon_server.service.config_file import load_config

    try:
        config = load_config(args.file, known_methods=METHODS)
    except ConfigError as exc:
        print(f"recon-server config check: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: OK")
    print(config.summary())
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    import torch

    from recon_server.dpm.checkpoint import load_checkpoint
    from recon_server.dpm.onnx import OnnxDenoiser, export_onnx

    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one line per folded initializer
    model, card = load_checkpoint(args.model)
    out = export_onnx(
        model, args.out, exporter=args.exporter, opset=args.opset, name=card.name, version=card.version
    )
    size_mb = out.stat().st_size / 1e6
    print(f"recon-server export-onnx: {card.name} {card.version} -> {out} ({size_mb:.1f} MB)")
    if args.check_size:
        onnx_model = OnnxDenoiser(out)
        gen = torch.Generator().manual_seed(0)
        n = args.check_size
        x = torch.randn(3, 2, n, n - 8 if n > 16 else n, generator=gen)
        sigma = torch.tensor([0.05, 0.5, 5.0])
        labels = [i % len(card.contrast_slots) for i in range(3)]
        with torch.no_grad():
            ref = model(x, sigma, labels)
        got = onnx_model(x, sigma, labels)
        rel = float((got - ref).norm() / ref.norm())
        print(
            f"recon-server export-onnx: ONNX Runtime ({onnx_model.provider}) vs torch on "
            f"{tuple(x.shape)}: relative error {rel:.2e}"
        )
        if not rel < EXPORT_TOLERANCE:
            print(f"recon-server export-onnx: relative error above {EXPORT_TOLERANCE}", file=sys.stderr)
            return 1
    return 0
