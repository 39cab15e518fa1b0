"""The one console entry, ``recon-server``, with a subcommand per job.

Each area of the package registers its own subcommands (``register(subparsers)`` in its
module of this package); this file only wires them together, configures logging and reports
the errors of a command: once, on one line, ``recon-server COMMAND: error: WHAT``, exit code 2.

Building the parser imports no torch (the command modules import their heavy parts in the
handlers), so ``recon-server pacs-echo`` and ``--help`` start fast.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import traceback
from collections.abc import Sequence

from recon_server import __version__
from recon_server.cli import data as data_commands
from recon_server.cli import demo as demo_commands
from recon_server.cli import dicom as dicom_commands
from recon_server.cli import ops as ops_commands
from recon_server.cli import options
from recon_server.cli import research as recon_commands
from recon_server.cli import scans as scan_commands
from recon_server.cli import serve as mrd_commands
from recon_server.cli import train as dpm_commands

COMMAND_MODULES = (
    mrd_commands,
    scan_commands,
    dicom_commands,
    data_commands,
    dpm_commands,
    recon_commands,
    ops_commands,
    demo_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recon-server",
        description="Inline MRI reconstruction: ISMRMRD raw data in, images and DICOM out.",
        formatter_class=options.HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"recon-server {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    _use_formatter(parser)
    # Commands that run other subcommands (``demo``) get this entry as ``args.run``.
    parser.set_defaults(run=main)
    return parser


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """One help formatter for every subcommand (no "(default: None)" where the default comes
    from elsewhere): replaces argparse's ArgumentDefaultsHelpFormatter wherever a module asked for it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if sub.formatter_class is argparse.ArgumentDefaultsHelpFormatter:
                    sub.formatter_class = options.HelpFormatter
                _use_formatter(sub)


#: (class name, what) of the listeners ``serve`` binds, for "port P is in use (WHAT)".
_LISTENERS = {
    "OpsServer": "health/metrics",
    "StreamServer": "MRD stream server",
    "GadgetronListener": "Gadgetron listener",
}


def _port_in_use(exc: OSError) -> str | None:
    """``port P is in use (WHAT)`` when one of serve's listeners could not bind (the listener is
    the innermost recon_server object in the traceback), else None."""
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        what = _LISTENERS.get(type(owner).__name__)
        if what is not None and type(owner).__module__.startswith("recon_server."):
            found = (owner, what)
    if found is None:
        return None
    owner, what = found
    port = getattr(owner, "port", None)
    if port is None:
        config = getattr(owner, "config", None)
        port = getattr(config, "gadgetron_port" if what.startswith("Gadgetron") else "port", None)
    return f"port {port} is in use ({what})"


def error_text(exc: BaseException) -> str:
    """What failed, on one line: the exception's own text, with an OSError's file name first
    (not Python's ``[Errno N] ...: 'name'``) and a listener's port for "address in use"."""
    text = str(exc)
    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            text = _port_in_use(exc) or f"address in use: {exc.strerror or exc}"
        elif exc.strerror and exc.filename is not None:
            reason = exc.strerror[:1].lower() + exc.strerror[1:]
            target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else exc.filename
            text = f"{target}: {reason}"
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:  # FileNotFoundError and ConnectionError are OSErrors
        # Printed, not logged as well: the log goes to the same terminal (one line, once).
        print(f"recon-server {args.command}: error: {error_text(exc)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"recon-server {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
