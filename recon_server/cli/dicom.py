"""Subcommands of the DICOM area: ``pacs-echo``, ``pacs-send``, ``spool-drain``, ``spool-requeue``.

Exit codes: 0 success, 1 the PACS refused or could not be reached (message on stderr),
2 bad options (raised as ValueError and reported by ``recon-server``).

pydicom, pynetdicom and the spool are imported in the handlers: ``recon-server`` builds its
parser without them (and without torch), so ``recon-server pacs-echo`` starts fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from recon_server.cli import options
from recon_server.dicom.config import DicomConfig, PacsDestination, RetryPolicy, TlsConfig


def _add_destination_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="pacs", help="destination name (spool sub-folder)")
    parser.add_argument("--host", required=True, help="PACS host name or address")
    parser.add_argument("--port", type=int, required=True, help="PACS DICOM port (1..65535)")
    parser.add_argument("--called-ae", required=True, help="AE title of the PACS")
    parser.add_argument("--calling-ae", default="RECONSRV", help="our AE title")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate(s) to trust (enables TLS)")
    parser.add_argument("--tls-cert", type=Path, help="our client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="private key of --tls-cert")
    parser.add_argument("--tls-hostname", help="name expected in the PACS certificate (default: --host)")
    parser.add_argument("--timeout", type=float, default=10.0, help="connect/ACSE timeout in seconds")


def _destination(args: argparse.Namespace) -> PacsDestination:
    tls = None
    if args.tls_ca is not None:
        tls = TlsConfig(
            ca_file=args.tls_ca,
            cert_file=args.tls_cert,
            key_file=args.tls_key,
            server_hostname=args.tls_hostname,
        )
    elif args.tls_cert is not None or args.tls_key is not None:
        raise ValueError("--tls-cert/--tls-key need --tls-ca (the CA that signed the PACS certificate)")
    return PacsDestination(
        name=args.name,
        host=args.host,
        port=args.port,
        called_ae=args.called_ae,
        calling_ae=args.calling_ae,
        tls=tls,
    )


def _config(args: argparse.Namespace, dest: PacsDestination) -> DicomConfig:
    spool_dir = getattr(args, "spool_dir", Path())
    return DicomConfig(
        output_dir=spool_dir,
        spool_dir=spool_dir,
        destinations=(dest,),
        allow_missing_identifiers=getattr(args, "allow_missing_identifiers", False),
        retry=RetryPolicy(
            initial_s=getattr(args, "retry_initial_s", 1.0), max_s=getattr(args, "retry_max_s", 300.0)
        ),
        connect_timeout_s=args.timeout,
        pause_between_stores_s=getattr(args, "pause_between_s", 0.0),
    )


def _quiet_pynetdicom() -> None:
    """pynetdicom logs each failed association on two ERROR lines of its own ("TCP Initialisation
    Error: ..."); these commands report the failure once, naming the PACS. Its log stays on
    with ``--log-level DEBUG``."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def _cmd_echo(args: argparse.Namespace) -> int:
    from recon_server.dicom.sender import echo

    _quiet_pynetdicom()
    dest = _destination(args)
    result = echo(dest, _config(args, dest))
    if result.ok:
        print(result.message)
    else:
        print(f"recon-server pacs-echo: error: {result.message}", file=sys.stderr)
    return 0 if result.ok else 1


def _drain(args: argparse.Namespace, config: DicomConfig) -> int:
    from recon_server.dicom.sender import PacsSender

    _quiet_pynetdicom()
    sender = PacsSender(config)
    timeout = None if args.forever else args.drain_timeout
    report = sender.drain(timeout_s=timeout)
    quarantined = sender.spool.quarantined(config.destinations[0].name)
    print(f"stored {report.stored}, quarantined {report.quarantined}, pending {report.pending}")
    for item, reason in quarantined:
        print(f"quarantined {item.sop_uid}: {reason.get('reason')}", file=sys.stderr)
    if report.pending:
        print(f"not all images sent: {report.errors[-1] if report.errors else 'timeout'}", file=sys.stderr)
    return 0 if report.pending == 0 and not quarantined else 1


def _cmd_send(args: argparse.Namespace) -> int:
    from pydicom import dcmread

    from recon_server.dicom.spool import Spool

    dest = _destination(args)
    config = _config(args, dest)
    spool = Spool(config.spool_dir)
    for path in args.files:
        ds = dcmread(path, stop_before_pixels=True)
        spool.enqueue_file(
            path,
            series_uid=str(ds.SeriesInstanceUID),
            sop_uid=str(ds.SOPInstanceUID),
            destinations=[dest.name],
        )
    return _drain(args, config)


def _cmd_drain(args: argparse.Namespace) -> int:
    dest = _destination(args)
    return _drain(args, _config(args, dest))


def _cmd_requeue(args: argparse.Namespace) -> int:
    from recon_server.dicom.spool import Spool

    count = Spool(args.spool_dir).requeue(args.name)
    print(f"moved {count} quarantined images of {args.name} back to pending")
    return 0


def _add_drain_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spool-dir", type=Path, required=True, help="spool folder")
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="give up after this many seconds")
    parser.add_argument("--forever", action="store_true", help="keep draining until killed")
    parser.add_argument("--retry-initial-s", type=float, default=1.0, help="first back-off delay")
    parser.add_argument("--retry-max-s", type=float, default=300.0, help="largest back-off delay")
    parser.add_argument(
        "--pause-between-s", type=float, default=0.0, help="pause between C-STOREs (throttle)"
    )
    parser.add_argument(
        "--allow-missing-identifiers",
        action="store_true",
        help="send images without PatientID (research PACS)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``recon-server`` parser."""
    fmt = options.HelpFormatter
    p = subparsers.add_parser("pacs-echo", help="C-ECHO a PACS (exit 0 if it answers)", formatter_class=fmt)
    _add_destination_args(p)
    p.set_defaults(func=_cmd_echo)

    p = subparsers.add_parser(
        "pacs-send", help="spool DICOM files and send them to a PACS", formatter_class=fmt
    )
    p.add_argument("files", nargs="+", type=Path, help="DICOM files")
    _add_destination_args(p)
    _add_drain_args(p)
    p.set_defaults(func=_cmd_send)

    p = subparsers.add_parser("spool-drain", help="send what is in the spool to a PACS", formatter_class=fmt)
    _add_destination_args(p)
    _add_drain_args(p)
    p.set_defaults(func=_cmd_drain)

    p = subparsers.add_parser(
        "spool-requeue", help="move quarantined images back to pending (after a fix)", formatter_class=fmt
    )
    p.add_argument("--spool-dir", type=Path, required=True, help="spool folder")
    p.add_argument("--name", default="pacs", help="destination name")
    p.set_defaults(func=_cmd_requeue)


def _pacs_address(text: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` -> (called AE, host, port)."""
    ae, at, rest = text.partition("@")
    host, colon, port = rest.rpartition(":")
    if not at or not colon or not ae or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected CALLED_AE@HOST:PORT, got {text!r}")
    return ae, host, int(port)


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """DICOM output options shared by ``serve`` and ``recon`` (the TOML file comes later)."""
    group = parser.add_argument_group("DICOM output")
    group.add_argument("--dicom-dir", type=Path, default=None, help="write each series as DICOM here")
    group.add_argument(
        "--spool-dir", type=Path, default=None, help="durable outbox (default DICOM_DIR/spool)"
    )
    group.add_argument(
        "--pacs",
        type=_pacs_address,
        action="append",
        default=[],
        metavar="CALLED_AE@HOST:PORT",
        help="send every series to this PACS by C-STORE (repeatable; needs --dicom-dir)",
    )
    group.add_argument("--calling-ae", default="RECONSRV", help="our AE title towards the PACS")
    group.add_argument("--uid-root", default="2.25.", help="root of the UIDs we create")
    group.add_argument(
        "--allow-missing-identifiers",
        action="store_true",
        help="send series without PatientID / StudyInstanceUID (research PACS only)",
    )


def output_config(args: argparse.Namespace) -> DicomConfig | None:
    """The :class:`DicomConfig` the options of :func:`add_output_args` ask for, or None."""
    if args.dicom_dir is None:
        if args.pacs:
            raise ValueError("--pacs needs --dicom-dir (every image is written and spooled first)")
        return None
    destinations = tuple(
        PacsDestination(name=f"pacs{i}", host=host, port=port, called_ae=ae, calling_ae=args.calling_ae)
        for i, (ae, host, port) in enumerate(args.pacs)
    )
    return DicomConfig(
        output_dir=args.dicom_dir,
        spool_dir=args.spool_dir or args.dicom_dir / "spool",
        uid_root=args.uid_root,
        destinations=destinations,
        allow_missing_identifiers=args.allow_missing_identifiers,
    )
