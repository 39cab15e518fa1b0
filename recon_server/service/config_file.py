"""The TOML configuration file -> :class:`~recon_server.service.config.AppConfig` (docs/configuration.md).

Every field is checked with the file and the dotted field name in the message
(:class:`~recon_server.service.config.ConfigError`); environment variables may override the TLS
file paths (:func:`tls_env_overrides`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from recon_server.dicom.config import DicomConfig, PacsDestination, RetryPolicy, TlsConfig
from recon_server.mrd.wire import WireLimits
from recon_server.service.config import AppConfig, ConfigError, OpsConfig, ServiceConfig

MAX_CONFIG_BYTES = 1 << 20
#: ``RECON_SERVER_TLS_<FIELD>`` applies to every destination with a ``tls`` table,
#: ``RECON_SERVER_TLS_<DEST>_<FIELD>`` to one (destination name upper-cased, ``-``/``.`` -> ``_``);
#: FIELD is ``CA_FILE``, ``CERT_FILE``, ``KEY_FILE`` or ``SERVER_HOSTNAME``.
ENV_TLS_PREFIX = "RECON_SERVER_TLS_"
TLS_ENV_FIELDS = ("ca_file", "cert_file", "key_file", "server_hostname")


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("an integer")
    return v


def _float(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError("a number")
    return float(v)


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError("a string")
    return v


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError("true or false")
    return v


def _str_list(v: object) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError("a list of strings")
    return tuple(v)


Conv = Callable[[object], Any]

SERVER_FIELDS: dict[str, Conv] = {
    "host": _str,
    "port": _int,
    "gadgetron_port": _int,
    "gadgetron_host": _str,
    "gadgetron_only": _bool,
    "device": _str,
    "image_dtype": _str,
    "max_pending_scans": _int,
    "socket_timeout_s": _float,
    "max_connections": _int,
    "stream_deadline_s": _float,
    "allowed_clients": _str_list,
    "output_dir": _str,
    "failed_scans_dir": _str,
    "journal_dir": _str,
    "shutdown_grace_s": _float,
    "shutdown_drain_s": _float,
    "ready_queue_threshold": _int,
}
LIMIT_FIELDS: dict[str, Conv] = {f.name: _int for f in dataclasses.fields(WireLimits)}
RECON_FIELDS: dict[str, Conv] = {
    "default_method": _str,
    "fallback_method": _str,
    "calibration_lines": _str,
    "model_dir": _str,
    "backend": _str,
    "onnx_file": _str,
    "onnx_providers": _str_list,
    "allowed_client_methods": _str_list,
    "default_time_limit_s": _float,
}
DICOM_FIELDS: dict[str, Conv] = {
    "output_dir": _str,
    "spool_dir": _str,
    "uid_root": _str,
    "allow_missing_identifiers": _bool,
    "manufacturer": _str,
    "connect_timeout_s": _float,
    "dimse_timeout_s": _float,
    "poll_interval_s": _float,
    "pause_between_stores_s": _float,
}
RETRY_FIELDS: dict[str, Conv] = {"initial_s": _float, "max_s": _float, "factor": _float, "abort_limit": _int}
DEST_FIELDS: dict[str, Conv] = {
    "name": _str,
    "host": _str,
    "port": _int,
    "called_ae": _str,
    "calling_ae": _str,
}
TLS_FIELDS: dict[str, Conv] = {
    "ca_file": _str,
    "cert_file": _str,
    "key_file": _str,
    "server_hostname": _str,
    "check_hostname": _bool,
}
OPS_FIELDS: dict[str, Conv] = {
    "http_host": _str,
    "http_port": _int,
    "log_format": _str,
    "log_level": _str,
}
SECTIONS = ("server", "recon", "dicom", "ops")


class _Loader:
    """Walks the parsed TOML, converting and naming each field; relative paths are resolved
    against the file's folder."""

    def __init__(self, source: str, base: Path) -> None:
        self.source = source
        self.base = base

    def error(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {message}")

    def table(self, data: Mapping[str, Any], where: str, key: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(f"{where}{key}", f"must be a table ([{where}{key}]), got {type(value).__name__}")
        return value

    def fields(
        self, data: Mapping[str, Any], where: str, schema: Mapping[str, Conv], tables: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key in tables:
                continue
            if key not in schema:
                known = ", ".join(sorted([*schema, *tables]))
                raise self.error(f"{where}{key}", f"unknown field (known in [{where[:-1]}]: {known})")
            try:
                out[key] = schema[key](value)
            except TypeError as exc:
                raise self.error(f"{where}{key}", f"must be {exc}, got {value!r}") from None
        return out

    def path(self, text: str) -> Path:
        p = Path(os.path.expandvars(text)).expanduser()
        return p if p.is_absolute() else self.base / p

    def build(
        self,
        where: str,
        factory: Callable[..., Any],
        *,
        fields: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``factory(**kwargs)``; its ValueError is reported at ``where``, or at the field its
        message starts with (``fields``: dataclass field -> dotted name)."""
        try:
            return factory(**kwargs)
        except (ValueError, TypeError) as exc:
            message = str(exc)
            first = re.split(r"[ :]", message, maxsplit=1)[0]
            named = (fields or {}).get(first)
            raise self.error(named or where, message) from None


def tls_env_overrides(dest_name: str, environ: Mapping[str, str]) -> dict[str, str]:
    """TLS fields set by the environment for one destination (per-destination beats global)."""
    key = re.sub(r"[^A-Z0-9]", "_", dest_name.upper())
    out: dict[str, str] = {}
    for name in TLS_ENV_FIELDS:
        for var in (f"{ENV_TLS_PREFIX}{name.upper()}", f"{ENV_TLS_PREFIX}{key}_{name.upper()}"):
            if environ.get(var):
                out[name] = environ[var]
    return out


def _check_tls_files(loader: _Loader, where: str, tls: TlsConfig) -> None:
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, name)
        if path is None:
            continue
        if not path.is_file():
            raise loader.error(f"{where}.{name}", f"file not found: {path}")
        if not os.access(path, os.R_OK):
            raise loader.error(f"{where}.{name}", f"file not readable: {path}")
    try:
        tls.ssl_context()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise loader.error(where, f"TLS files do not load: {exc}") from None


def _destination(loader: _Loader, i: int, raw: object, environ: Mapping[str, str]) -> PacsDestination:
    where = f"dicom.destinations[{i}]"
    if not isinstance(raw, dict):
        raise loader.error(where, "must be a table ([[dicom.destinations]])")
    values = loader.fields(raw, where + ".", DEST_FIELDS, tables=("tls",))
    for required in ("name", "host", "port", "called_ae"):
        if required not in values:
            raise loader.error(f"{where}.{required}", "missing (required)")
    name = values["name"]
    tls_raw = loader.table(raw, where + ".", "tls")
    env = tls_env_overrides(name, environ)
    if tls_raw or env:
        tls_values = loader.fields(tls_raw, f"{where}.tls.", TLS_FIELDS)
        tls_values.update(env)
        if "ca_file" not in tls_values:
            raise loader.error(f"{where}.tls.ca_file", "missing (required for TLS)")
        for key in ("ca_file", "cert_file", "key_file"):
            if key in tls_values:
                tls_values[key] = loader.path(tls_values[key])
        tls = loader.build(f"{where}.tls", TlsConfig, **tls_values)
        _check_tls_files(loader, f"{where}.tls", tls)
        values["tls"] = tls
    return loader.build(where, PacsDestination, **values)


def parse_config(
    data: Mapping[str, Any],
    *,
    source: str = "<config>",
    base: Path | None = None,
    environ: Mapping[str, str] | None = None,
    known_methods: Mapping[str, object] | None = None,
) -> AppConfig:
    """Validate parsed TOML ``data`` and build an :class:`AppConfig` (see module docstring)."""
    loader = _Loader(source, base or Path.cwd())
    for key in data:
        if key not in SECTIONS:
            raise loader.error(key, f"unknown section (known: {', '.join(SECTIONS)})")
    service = _service(loader, data, known_methods)
    dicom = _dicom(loader, data, os.environ if environ is None else environ) if "dicom" in data else None
    ops = loader.fields(loader.table(data, "", "ops"), "ops.", OPS_FIELDS)
    ops_fields = {k: f"ops.{k}" for k in OPS_FIELDS}
    return AppConfig(
        service=service, dicom=dicom, ops=loader.build("ops", OpsConfig, fields=ops_fields, **ops)
    )


def _service(loader: _Loader, data: Mapping[str, Any], known: Mapping[str, object] | None) -> ServiceConfig:
    """``[server]`` + ``[recon]`` -> :class:`ServiceConfig`, method names checked against ``known``."""
    server_raw = loader.table(data, "", "server")
    server = loader.fields(server_raw, "server.", SERVER_FIELDS, tables=("limits",))
    limits = loader.fields(loader.table(server_raw, "server.", "limits"), "server.limits.", LIMIT_FIELDS)
    limit_fields = {f"WireLimits.{k}": f"server.limits.{k}" for k in LIMIT_FIELDS}
    server["limits"] = loader.build("server.limits", WireLimits, fields=limit_fields, **limits)
    recon_raw = loader.table(data, "", "recon")
    recon = loader.fields(recon_raw, "recon.", RECON_FIELDS, tables=("methods", "time_limits"))
    time_limits = {}
    for method, seconds in loader.table(recon_raw, "recon.", "time_limits").items():
        try:
            time_limits[method] = _float(seconds)
        except TypeError as exc:
            raise loader.error(f"recon.time_limits.{method}", f"must be {exc}, got {seconds!r}") from None
    if time_limits:
        recon["time_limits"] = time_limits
    methods = {}
    for contrast, method in loader.table(recon_raw, "recon.", "methods").items():
        if not isinstance(method, str) or not method:
            raise loader.error(f"recon.methods.{contrast}", f"must be a method name, got {method!r}")
        methods[contrast.strip().upper()] = method
    for key in ("output_dir", "failed_scans_dir", "journal_dir"):
        if key in server:
            server[key] = loader.path(server[key])
    for key in ("model_dir", "onnx_file"):
        if key in recon:
            recon[key] = loader.path(recon[key])
    field_names = {k: f"server.{k}" for k in SERVER_FIELDS} | {k: f"recon.{k}" for k in RECON_FIELDS}
    service: ServiceConfig = loader.build(
        "server", ServiceConfig, fields=field_names, **server, **recon, methods=methods
    )
    if known is not None:
        _check_method_names(loader, service, known)
    try:
        service.check_model(known)
    except ValueError as exc:
        raise loader.error("recon.model_dir", str(exc)) from None
    return service


def _check_method_names(loader: _Loader, service: ServiceConfig, known: Mapping[str, object]) -> None:
    named = [("recon.default_method", service.default_method)]
    if service.fallback_method is not None:
        named.append(("recon.fallback_method", service.fallback_method))
    named += [(f"recon.methods.{contrast}", method) for contrast, method in service.methods.items()]
    named += [(f"recon.time_limits.{method}", method) for method in service.time_limits]
    named += [("recon.allowed_client_methods", m) for m in service.allowed_client_methods if m != "*"]
    for where, method in named:
        if method not in known:
            raise loader.error(where, f"unknown reconstruction method {method!r}; known: {sorted(known)}")


def _dicom(loader: _Loader, data: Mapping[str, Any], environ: Mapping[str, str]) -> DicomConfig:
    """``[dicom]`` (with ``[dicom.retry]`` and ``[[dicom.destinations]]``) -> :class:`DicomConfig`."""
    dicom_raw = loader.table(data, "", "dicom")
    values = loader.fields(dicom_raw, "dicom.", DICOM_FIELDS, tables=("retry", "destinations"))
    if "output_dir" not in values:
        raise loader.error("dicom.output_dir", "missing (required when [dicom] is present)")
    values["output_dir"] = loader.path(values["output_dir"])
    values["spool_dir"] = (
        loader.path(values["spool_dir"]) if "spool_dir" in values else values["output_dir"] / "spool"
    )
    retry = loader.fields(loader.table(dicom_raw, "dicom.", "retry"), "dicom.retry.", RETRY_FIELDS)
    values["retry"] = loader.build("dicom.retry", RetryPolicy, **retry)
    dests_raw = dicom_raw.get("destinations", [])
    if not isinstance(dests_raw, list):
        raise loader.error("dicom.destinations", "must be an array of tables ([[dicom.destinations]])")
    values["destinations"] = tuple(_destination(loader, i, d, environ) for i, d in enumerate(dests_raw))
    dicom_fields = {k: f"dicom.{k}" for k in DICOM_FIELDS}
    dicom: DicomConfig = loader.build("dicom", DicomConfig, fields=dicom_fields, **values)
    return dicom


def load_config(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    known_methods: Mapping[str, object] | None = None,
) -> AppConfig:
    """Read and validate a TOML configuration file; relative paths are relative to its folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: configuration file not found")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    config = parse_config(
        data, source=str(p), base=p.resolve().parent, environ=environ, known_methods=known_methods
    )
    return dataclasses.replace(config, source=p)
