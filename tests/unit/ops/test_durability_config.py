"""Issue 14 configuration: journal, shutdown, readiness threshold, client methods, time limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from recon_server.recon.methods import METHODS
from recon_server.service.config import DEFAULT_TIME_LIMIT_S, ConfigError, ServiceConfig
from recon_server.service.config_file import load_config


def _load(tmp_path: Path, text: str) -> ServiceConfig:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(path, known_methods=METHODS).service


def test_fields_from_the_file(tmp_path: Path) -> None:
    service = _load(
        tmp_path,
        """
[server]
journal_dir = "journal"
shutdown_grace_s = 3
shutdown_drain_s = 0
ready_queue_threshold = 1

[recon]
allowed_client_methods = ["zero-filled", "dps"]
default_time_limit_s = 120

[recon.time_limits]
dps = 30
""",
    )
    assert service.journal_dir == tmp_path / "journal"
    assert (service.shutdown_grace_s, service.shutdown_drain_s, service.ready_queue_threshold) == (3, 0, 1)
    assert service.time_limit_for("dps") == 30 and service.time_limit_for("cg-sense") == 120
    # The server's own default method is always allowed besides the list.
    assert service.client_methods() == {"zero-filled", "dps", "cg-sense"}


def test_defaults_keep_dps_opt_in() -> None:
    service = ServiceConfig()
    allowed = service.client_methods()
    assert allowed is not None and "dps" not in allowed and "dps-fast" in allowed
    assert service.time_limit_for("dps") == DEFAULT_TIME_LIMIT_S
    assert ServiceConfig(allowed_client_methods=("*",)).client_methods() is None
    assert "dps" in (ServiceConfig(default_method="dps").client_methods() or ())


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[recon.time_limits]\ndps = 0\n", "time_limits"),
        ("[recon.time_limits]\ndps = 'x'\n", "recon.time_limits.dps"),
        ("[recon.time_limits]\nnope = 3\n", "recon.time_limits.nope"),
        ("[recon]\nallowed_client_methods = ['nope']\n", "recon.allowed_client_methods"),
        ("[server]\nready_queue_threshold = -1\n", "ready_queue_threshold"),
        ("[server]\nshutdown_grace_s = -1\n", "shutdown_grace_s"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        _load(tmp_path, text)
