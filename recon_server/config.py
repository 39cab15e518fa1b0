"""Service settings in one frozen dataclass, validated once at the CLI / wire boundary.

The TOML file loader comes later; for now the CLI builds a :class:`ServiceConfig` from its
options. Methods are chosen per contrast label (``FLAIR`` -> ``dps`` ...), falling back to
``default_method``; a ``--method`` override beats both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from recon_server.mrd.wire import WireLimits

DEFAULT_PORT = 9002


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of ``recon-server serve`` (and of ``recon`` / the gadget, where they apply)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    gadgetron_port: int | None = None
    gadgetron_host: str = "127.0.0.1"
    methods: Mapping[str, str] = field(default_factory=dict)
    default_method: str = "cg-sense"
    device: str = "cpu"
    limits: WireLimits = field(default_factory=WireLimits)
    output_dir: Path | None = None
    image_dtype: str = "float32"  # or "uint16" for the ISMRMRD images sent back
    max_pending_scans: int = 8
    socket_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("port", "gadgetron_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= int(value) <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {value}")
        if self.image_dtype not in ("float32", "uint16"):
            raise ValueError(f"image_dtype must be float32 or uint16, got {self.image_dtype!r}")
        if self.max_pending_scans < 1:
            raise ValueError(f"max_pending_scans must be >= 1, got {self.max_pending_scans}")
        if self.socket_timeout_s <= 0:
            raise ValueError(f"socket_timeout_s must be > 0, got {self.socket_timeout_s}")

    def method_for(self, contrast: str, override: str | None = None) -> str:
        """The method for a contrast label: override, else per-contrast entry, else default."""
        if override:
            return override
        return self.methods.get(contrast.upper(), self.default_method) if contrast else self.default_method

    def check_methods(self, known: Mapping[str, object]) -> None:
        """ValueError if a configured method is not in the registry ``known``."""
        for name in {self.default_method, *self.methods.values()}:
            if name not in known:
                raise ValueError(f"unknown reconstruction method {name!r}; known: {sorted(known)}")
