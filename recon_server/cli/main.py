"""The one console entry, ``recon-server``, with a subcommand per job.

Each area of the package registers its own subcommands (``register(subparsers)`` in its
``commands`` module); this file only wires them together and configures logging.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from recon_server import __version__
from recon_server.cli import data as data_commands
from recon_server.cli import dicom as dicom_commands
from recon_server.cli import ops as ops_commands
from recon_server.cli import research as recon_commands
from recon_server.cli import serve as mrd_commands
from recon_server.cli import train as dpm_commands

COMMAND_MODULES = (mrd_commands, dicom_commands, data_commands, dpm_commands, recon_commands, ops_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recon-server",
        description="Inline MRI reconstruction: ISMRMRD raw data in, images and DICOM out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"recon-server {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as exc:
        logging.getLogger("recon_server").error("%s", exc)
        print(f"recon-server {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
