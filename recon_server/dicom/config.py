"""Typed settings of the DICOM output: where files go, which PACS receive them, how to retry.

All classes are frozen dataclasses validated in ``__post_init__`` so a bad setting fails at
start-up with a message naming the field, never in the middle of a transfer. The TOML loader
(service configuration) builds these objects; tests and the CLI build them directly.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

#: UID root for ``2.25.`` (UUID-derived) UIDs, the default when no organisation root is given.
UUID_UID_ROOT = "2.25."

_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")
_DEST_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def validate_ae_title(value: str, what: str) -> str:
    """Check a DICOM AE title: 1-16 printable ASCII characters, no backslash, not blank."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    if len(value) > 16:
        raise ValueError(f"{what} {value!r} is longer than 16 characters")
    if not all(32 <= ord(ch) < 127 for ch in value) or "\\" in value:
        raise ValueError(f"{what} {value!r} must be printable ASCII without backslashes")
    if value != value.strip():
        raise ValueError(f"{what} {value!r} must not start or end with spaces")
    return value


def validate_uid_root(root: str) -> str:
    """Check a UID root: dotted numeric components without leading zeros, ending in a dot.

    At most 40 characters so that at least 24 digits remain for the hash part of a UID.
    """
    if not _UID_ROOT_RE.match(root):
        raise ValueError(
            f"uid_root {root!r} must be dotted numbers without leading zeros ending with '.', e.g. '2.25.'"
        )
    if len(root) > 40:
        raise ValueError(f"uid_root {root!r} is longer than 40 characters; UIDs are limited to 64")
    return root


@dataclass(frozen=True)
class TlsConfig:
    """TLS for one destination: CA bundle to trust, and our certificate for mutual TLS.

    ``cert_file``/``key_file`` are both given (mutual TLS) or both omitted (server
    authentication only). ``server_hostname`` is the name checked against the PACS
    certificate (defaults to the destination host).
    """

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_hostname: str | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS cert_file and key_file must be given together (or neither)")
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))

    def ssl_context(self) -> ssl.SSLContext:
        """Client context: TLS >= 1.2, PACS certificate verified against ``ca_file``."""
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"TLS file not found: {path}")
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = self.check_hostname
        if self.cert_file is not None and self.key_file is not None:
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


@dataclass(frozen=True)
class PacsDestination:
    """One C-STORE receiver. ``name`` is also the spool sub-folder of this destination."""

    name: str
    host: str
    port: int
    called_ae: str
    calling_ae: str = "RECONSRV"
    tls: TlsConfig | None = None

    def __post_init__(self) -> None:
        if not _DEST_NAME_RE.match(self.name):
            raise ValueError(
                f"destination name {self.name!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
            )
        if not self.host or any(ch.isspace() for ch in self.host):
            raise ValueError(f"destination {self.name!r}: host {self.host!r} is empty or has spaces")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"destination {self.name!r}: port {self.port!r} must be an integer 1..65535")
        validate_ae_title(self.called_ae, f"destination {self.name!r}: called_ae")
        validate_ae_title(self.calling_ae, f"destination {self.name!r}: calling_ae")

    @property
    def label(self) -> str:
        """Human-readable address for messages: ``name (CALLING -> CALLED@host:port)``."""
        tls = " TLS" if self.tls else ""
        return f"{self.name} ({self.calling_ae} -> {self.called_ae}@{self.host}:{self.port}{tls})"


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential back-off: delay_n = min(max_s, initial_s * factor**(n-1)).

    ``abort_limit``: an association that is accepted and then aborted by the PACS at the
    first C-STORE this many times in a row is treated as a permanent refusal (Orthanc reports
    an unknown calling AE title this way).
    """

    initial_s: float = 1.0
    max_s: float = 300.0
    factor: float = 2.0
    abort_limit: int = 3

    def __post_init__(self) -> None:
        if not self.initial_s > 0:
            raise ValueError(f"retry initial_s must be > 0, got {self.initial_s}")
        if not self.max_s >= self.initial_s:
            raise ValueError(f"retry max_s ({self.max_s}) must be >= initial_s ({self.initial_s})")
        if not self.factor >= 1:
            raise ValueError(f"retry factor must be >= 1, got {self.factor}")
        if self.abort_limit < 1:
            raise ValueError(f"retry abort_limit must be >= 1, got {self.abort_limit}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (``failures >= 1``)."""
        exponent = max(0, failures - 1)
        # cap the exponent first so factor**exponent cannot overflow
        if exponent > 64:
            return self.max_s
        return float(min(self.max_s, self.initial_s * self.factor**exponent))


@dataclass(frozen=True)
class DicomConfig:
    """DICOM output settings.

    output_dir: where every series is written (``output_dir/<SeriesInstanceUID>/IMnnnnn.dcm``).
    spool_dir:  durable outbox, one sub-folder per destination (see :mod:`.spool`).
    uid_root:   root of generated UIDs (``2.25.`` = UUID-derived, or an organisation root).
    allow_missing_identifiers: send images without PatientID / header StudyInstanceUID
        (research PACS only); refused by default.
    """

    output_dir: Path
    spool_dir: Path
    uid_root: str = UUID_UID_ROOT
    destinations: tuple[PacsDestination, ...] = ()
    allow_missing_identifiers: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    manufacturer: str = "recon-server"
    connect_timeout_s: float = 10.0
    dimse_timeout_s: float = 60.0
    poll_interval_s: float = 2.0
    pause_between_stores_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        object.__setattr__(self, "spool_dir", Path(self.spool_dir))
        object.__setattr__(self, "destinations", tuple(self.destinations))
        validate_uid_root(self.uid_root)
        names = [d.name for d in self.destinations]
        for dest in self.destinations:
            if not isinstance(dest, PacsDestination):
                raise ValueError(f"destinations must be PacsDestination objects, got {type(dest).__name__}")
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must be unique, got {names}")
        if not self.manufacturer or len(self.manufacturer) > 64:
            raise ValueError("manufacturer must be 1-64 characters (DICOM LO)")
        for name in ("connect_timeout_s", "dimse_timeout_s", "poll_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.pause_between_stores_s < 0:
            raise ValueError("pause_between_stores_s must be >= 0")
