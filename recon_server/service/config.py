"""Service settings: frozen dataclasses, validated once, built from one TOML file or the CLI.

``load_config(path)`` reads ``recon-server.toml`` (stdlib :mod:`tomllib`) into an
:class:`AppConfig`: a :class:`ServiceConfig` (``[server]`` + ``[recon]``), an optional
:class:`~recon_server.dicom.config.DicomConfig` (``[dicom]``) and an :class:`OpsConfig`
(``[ops]``). Every field is checked at start: unknown keys, wrong TOML types, ranges, files that
must exist. Errors are :class:`ConfigError` (a ValueError) whose message starts with the file
and the dotted field name, e.g. ``recon-server.toml: server.port: must be in 0..65535, got 70000``.
Field-by-field documentation: docs/configuration.md.

Secrets do not have to live in the file: environment variables override the TLS file paths
(:data:`ENV_TLS_PREFIX`), see :func:`tls_env_overrides`.

Methods are chosen per contrast label (``FLAIR`` -> ``dps`` ...), falling back to
``default_method``; a method named by the client (or ``recon --method``) beats both. When the
chosen method fails on a scan (model missing, out of memory, ...), ``fallback_method``
(``cg-sense``; ``None`` / ``"none"`` disables) reconstructs it instead (``pipeline``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from recon_server.dicom.config import DicomConfig
from recon_server.mrd.assemble import CALIBRATION_LINE_MODES
from recon_server.mrd.wire import WireLimits

if TYPE_CHECKING:
    from recon_server.recon.methods import DiffusionSettings

DEFAULT_PORT = 9002
# Posterior samples one scan may ask for (each costs a full diffusion reconstruction).
MAX_POSTERIOR_SAMPLES = 32
DEFAULT_HTTP_PORT = 9090
#: What reconstructs a scan whose method failed, unless the configuration says otherwise.
DEFAULT_FALLBACK_METHOD = "cg-sense"
#: Methods a client may ask for unless ``allowed_client_methods`` says otherwise: every method
#: but faithful ``dps`` (minutes per scan; opt-in). ``"*"`` in the field allows any method.
DEFAULT_CLIENT_METHODS = ("zero-filled", "cg-sense", "l1-wavelet", "dps-fast", "dps-warm")
#: Seconds a method may run on one scan unless ``time_limits`` names it.
DEFAULT_TIME_LIMIT_S = 900.0

#: Methods that need a trained model (``recon.model_dir``). A registered method may also carry
#: ``needs_model = True`` as an attribute; :func:`needs_model` accepts either.
MODEL_METHODS = frozenset({"dps", "dps-fast"})
BACKENDS = ("torch", "onnx")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A configuration file (or field) is invalid; the message names the file and the field."""


def needs_model(method: str, known: Mapping[str, object] | None = None) -> bool:
    """True for the diffusion samplers (names in :data:`MODEL_METHODS` or ``needs_model``)."""
    impl = (known or {}).get(method)
    return method in MODEL_METHODS or bool(getattr(impl, "needs_model", False))


def device_unavailable(device: str) -> str | None:
    """Why torch cannot run on ``device`` on this host (one line), or None when it can.

    ``serve`` refuses to start on such a device rather than fail every scan (docs/service.md).
    """
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", built without CUDA")
            return f"CUDA is not available on this host ({build})"
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            return f"this host has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
    elif kind == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this host"
    return None


def _check_port(name: str, value: object, *, allow_zero: bool = True) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise ValueError(f"{name} must be an integer in {low}..65535, got {value!r}")


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of ``recon-server serve`` (and of ``recon`` / the gadget, where they apply).

    Port 0 asks the OS for a free port (tests). ``model_dir`` is the checkpoint directory the
    diffusion methods use; ``backend`` runs its denoiser on torch or ONNX Runtime
    (``onnx_file``, default ``model_dir/denoiser.onnx``, made by ``recon-server export-onnx``).
    ``fallback_method`` reconstructs a scan whose method failed (None or ``"none"``: no fallback,
    the scan fails). ``calibration_lines``: what calibration-only readouts are
    (``mrd.assemble.CALIBRATION_LINE_MODES``: ``auto``, ``data``, ``calibration``).
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    gadgetron_port: int | None = None
    gadgetron_host: str = "127.0.0.1"
    gadgetron_only: bool = False
    methods: Mapping[str, str] = field(default_factory=dict)
    default_method: str = "cg-sense"
    fallback_method: str | None = DEFAULT_FALLBACK_METHOD
    calibration_lines: str = "auto"
    device: str = "cpu"
    limits: WireLimits = field(default_factory=WireLimits)
    output_dir: Path | None = None
    failed_scans_dir: Path | None = None  # raw data of scans whose reconstruction failed
    image_dtype: str = "float32"  # or "uint16" for the ISMRMRD images sent back
    max_pending_scans: int = 8
    socket_timeout_s: float = 300.0
    # Connections (service.listener), per listener: at most this many at once (one more is told
    # ERR and closed), this long to send a whole stream, only from these networks (empty: any).
    max_connections: int = 32
    stream_deadline_s: float = 3600.0
    allowed_clients: tuple[str, ...] = ()
    model_dir: Path | None = None
    backend: str = "torch"
    onnx_file: Path | None = None
    onnx_providers: tuple[str, ...] = ()
    journal_dir: Path | None = None  # every scan's raw data until delivered (service.journal)
    shutdown_grace_s: float = 10.0  # SIGTERM: seconds running scans get to finish
    shutdown_drain_s: float = 10.0  # SIGTERM: seconds the DICOM spool is drained
    ready_queue_threshold: int = 4  # /readyz false with more scans waiting for the worker
    allowed_client_methods: tuple[str, ...] = DEFAULT_CLIENT_METHODS
    time_limits: Mapping[str, float] = field(default_factory=dict)  # seconds per method
    default_time_limit_s: float | None = DEFAULT_TIME_LIMIT_S

    def __post_init__(self) -> None:
        _check_port("port", self.port)
        if self.gadgetron_port is not None:
            _check_port("gadgetron_port", self.gadgetron_port)
        if self.gadgetron_only and self.gadgetron_port is None:
            raise ValueError("gadgetron_only needs gadgetron_port")
        for name in ("host", "gadgetron_host"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or any(ch.isspace() for ch in value):
                raise ValueError(f"{name} must be a host name or address without spaces, got {value!r}")
        if self.image_dtype not in ("float32", "uint16"):
            raise ValueError(f"image_dtype must be float32 or uint16, got {self.image_dtype!r}")
        if self.max_pending_scans < 1:
            raise ValueError(f"max_pending_scans must be >= 1, got {self.max_pending_scans}")
        if self.socket_timeout_s <= 0:
            raise ValueError(f"socket_timeout_s must be > 0, got {self.socket_timeout_s}")
        self._check_connections()
        if not re.fullmatch(r"cpu|cuda(:[0-9]+)?|mps", self.device):
            raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.calibration_lines not in CALIBRATION_LINE_MODES:
            modes = ", ".join(CALIBRATION_LINE_MODES)
            raise ValueError(f"calibration_lines must be one of {modes}, got {self.calibration_lines!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        for contrast, method in self.methods.items():
            if not contrast or contrast != contrast.upper() or not method:
                raise ValueError(f"methods: contrast labels are upper case, got {contrast!r} = {method!r}")
        for name in ("output_dir", "failed_scans_dir", "model_dir", "onnx_file"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "onnx_providers", tuple(self.onnx_providers))
        fallback = self.fallback_method
        if fallback is not None and (not isinstance(fallback, str) or not fallback.strip()):
            raise ValueError(f"fallback_method must be a method name or 'none', got {fallback!r}")
        if fallback is not None and fallback.strip().lower() == "none":
            object.__setattr__(self, "fallback_method", None)
        self._check_durability()

    def _check_durability(self) -> None:
        if self.journal_dir is not None:
            object.__setattr__(self, "journal_dir", Path(self.journal_dir))
        for name in ("shutdown_grace_s", "shutdown_drain_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ready_queue_threshold < 0:
            raise ValueError(f"ready_queue_threshold must be >= 0, got {self.ready_queue_threshold}")
        allowed = self.allowed_client_methods
        if isinstance(allowed, str) or not all(isinstance(m, str) and m for m in allowed):
            raise ValueError(f"allowed_client_methods must be a list of method names, got {allowed!r}")
        object.__setattr__(self, "allowed_client_methods", tuple(allowed))
        limits = dict(self.time_limits)
        if self.default_time_limit_s is not None:
            limits["default_time_limit_s"] = self.default_time_limit_s
        for name, seconds in limits.items():
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
                raise ValueError(f"time_limits: {name} must be a number of seconds > 0, got {seconds!r}")

    def time_limit_for(self, method: str) -> float | None:
        """Seconds ``method`` may run on one scan (``time_limits``, else ``default_time_limit_s``)."""
        return self.time_limits.get(method, self.default_time_limit_s)

    def client_methods(self) -> frozenset[str] | None:
        """Methods a client may ask for (None: any): ``allowed_client_methods`` and the server's own."""
        if "*" in self.allowed_client_methods:
            return None
        return frozenset(self.allowed_client_methods) | self.configured_methods()

    def _check_connections(self) -> None:
        from recon_server.service.listener import parse_networks

        count = self.max_connections
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"max_connections must be an integer >= 1, got {count!r}")
        if not self.stream_deadline_s > 0:
            raise ValueError(f"stream_deadline_s must be > 0, got {self.stream_deadline_s}")
        clients = self.allowed_clients
        if isinstance(clients, str):
            raise ValueError(f"allowed_clients must be a list of networks, got {clients!r}")
        nets = parse_networks(clients)
        object.__setattr__(self, "allowed_clients", tuple(str(n) for n in nets))

    @property
    def resolved_onnx_file(self) -> Path | None:
        """The ONNX file the onnx backend loads (``onnx_file`` or ``model_dir/denoiser.onnx``)."""
        if self.onnx_file is not None:
            return self.onnx_file
        return self.model_dir / "denoiser.onnx" if self.model_dir is not None else None

    def diffusion_settings(self) -> DiffusionSettings:
        """What the diffusion methods run with: this configuration's model and device."""
        from recon_server.recon.methods import DiffusionSettings  # torch: not at import

        return DiffusionSettings(model_dir=self.model_dir, device=self.device)

    def method_for(self, contrast: str, override: str | None = None) -> str:
        """The method for a contrast label: override, else per-contrast entry, else default."""
        if override:
            return override
        return self.methods.get(contrast.upper(), self.default_method) if contrast else self.default_method

    def configured_methods(self) -> set[str]:
        return {self.default_method, *self.methods.values()}

    def check_methods(self, known: Mapping[str, object]) -> None:
        """ValueError if a configured method (or the fallback) is not in the registry ``known``."""
        for name in self.configured_methods():
            if name not in known:
                raise ValueError(f"unknown reconstruction method {name!r}; known: {sorted(known)}")
        if self.fallback_method is not None and self.fallback_method not in known:
            raise ValueError(
                f"fallback_method: unknown reconstruction method {self.fallback_method!r}; "
                f"known: {sorted(known)} (or 'none')"
            )
        for where, names in (
            ("allowed_client_methods", [m for m in self.allowed_client_methods if m != "*"]),
            ("time_limits", list(self.time_limits)),
        ):
            for name in names:
                if name not in known:
                    raise ValueError(
                        f"{where}: unknown reconstruction method {name!r}; known: {sorted(known)}"
                    )

    def check_model(self, known: Mapping[str, object] | None = None) -> None:
        """ValueError unless the model files the configured methods and backend need exist."""
        configured = self.configured_methods() | ({self.fallback_method} if self.fallback_method else set())
        wanting = sorted(m for m in configured if needs_model(m, known))
        if self.model_dir is None:
            if wanting:
                raise ValueError(f"model_dir is required by method(s) {wanting}")
            return
        if not (self.model_dir / "card.json").is_file():
            raise ValueError(f"model_dir {self.model_dir} is not a checkpoint directory (no card.json)")
        onnx = self.resolved_onnx_file
        if self.backend == "onnx" and onnx is not None and not onnx.is_file():
            raise ValueError(
                f"onnx_file {onnx} not found (backend 'onnx'; make it with "
                f"'recon-server export-onnx --model {self.model_dir} --out {onnx}')"
            )


@dataclass(frozen=True)
class OpsConfig:
    """The operations endpoint and logging. ``http_port`` 0 picks a free port; None disables."""

    http_host: str = "127.0.0.1"
    http_port: int | None = DEFAULT_HTTP_PORT
    log_format: str = "text"
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.http_port is not None:
            _check_port("http_port", self.http_port)
        if not self.http_host or any(ch.isspace() for ch in self.http_host):
            raise ValueError(f"http_host must be a host name or address, got {self.http_host!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {list(LOG_FORMATS)}, got {self.log_format!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {list(LOG_LEVELS)}, got {self.log_level!r}")


@dataclass(frozen=True)
class AppConfig:
    """Everything ``recon-server serve --config FILE`` runs with."""

    service: ServiceConfig = field(default_factory=ServiceConfig)
    dicom: DicomConfig | None = None
    ops: OpsConfig = field(default_factory=OpsConfig)
    source: Path | None = None

    def summary(self) -> str:
        """A few human-readable lines (``config check`` prints them)."""
        s, o = self.service, self.ops
        lines = [
            f"MRD stream server: {'off' if s.gadgetron_only else f'{s.host}:{s.port}'}",
            f"Gadgetron <connect> listener: "
            f"{f'{s.gadgetron_host}:{s.gadgetron_port}' if s.gadgetron_port is not None else 'off'}",
            f"device {s.device}, images {s.image_dtype}, up to {s.max_pending_scans} queued scans",
            f"connections: at most {s.max_connections} per listener, {s.stream_deadline_s:g} s per stream, "
            f"clients {', '.join(s.allowed_clients) or 'any address'}",
            f"methods: default {s.default_method}"
            + "".join(f", {c} -> {m}" for c, m in sorted(s.methods.items()))
            + f"; fallback {s.fallback_method or 'none'}",
            f"model: {s.model_dir or 'none'} (backend {s.backend}"
            + (f", {s.resolved_onnx_file}" if s.backend == "onnx" else "")
            + ")",
        ]
        if self.dicom is None:
            lines.append("DICOM output: off")
        else:
            lines.append(f"DICOM output: {self.dicom.output_dir}, spool {self.dicom.spool_dir}")
            lines += [f"  PACS {d.label}" for d in self.dicom.destinations]
        http = f"http://{o.http_host}:{o.http_port}" if o.http_port is not None else "off"
        lines.append(f"health/metrics: {http}; logs {o.log_format} at {o.log_level}")
        return "\n".join(lines)
