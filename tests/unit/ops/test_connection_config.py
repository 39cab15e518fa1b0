"""Connection settings: TOML fields, ``serve`` options, and what the compose files publish."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from recon_server.cli.main import build_parser
from recon_server.cli.serve import serve_config
from recon_server.service.config import ConfigError, ServiceConfig
from recon_server.service.config_file import parse_config
from recon_server.service.listener import client_allowed, parse_networks

REPO = Path(__file__).resolve().parents[3]


def test_toml_fields_and_their_checks() -> None:
    app = parse_config(
        {
            "server": {
                "max_connections": 4,
                "stream_deadline_s": 90,
                "allowed_clients": ["10.20.0.0/16", "192.168.1.7", "fd00::/8"],
                "limits": {"max_scan_bytes": 1 << 30, "max_matrix": 512},
            }
        }
    )
    s = app.service
    assert (s.max_connections, s.stream_deadline_s) == (4, 90.0)
    assert s.allowed_clients == ("10.20.0.0/16", "192.168.1.7/32", "fd00::/8")
    assert (s.limits.max_scan_bytes, s.limits.max_matrix) == (1 << 30, 512)
    assert "at most 4 per listener, 90 s per stream, clients 10.20.0.0/16" in app.summary()
    bad = {
        "max_connections": (0, "server.max_connections"),
        "stream_deadline_s": (0, "server.stream_deadline_s"),
        "allowed_clients": (["10.0.0.0/33"], "server.allowed_clients: allowed_clients entry '10.0.0.0/33'"),
    }
    for field, (value, message) in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config({"server": {field: value}})
    with pytest.raises(ConfigError, match="server.limits.max_scan_bytes"):
        parse_config({"server": {"limits": {"max_scan_bytes": -1}}})


def test_serve_options_override_the_file() -> None:
    args = build_parser().parse_args(
        ["serve", "--max-connections", "3", "--stream-deadline", "12.5"]
        + ["--allow-client", "127.0.0.0/8", "--allow-client", "::1", "--max-scan-bytes", "1.5G"]
    )
    s = serve_config(args).service
    assert (s.max_connections, s.stream_deadline_s) == (3, 12.5)
    assert s.allowed_clients == ("127.0.0.0/8", "::1/128") and s.limits.max_scan_bytes == 3 << 29
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-scan-bytes", "lots"])
    default = ServiceConfig()
    assert (default.max_connections, default.stream_deadline_s, default.allowed_clients) == (32, 3600.0, ())


def test_allow_list_matching() -> None:
    nets = parse_networks(["10.1.0.0/16", "fd00::/8"])
    assert client_allowed(("10.1.2.3", 5000), nets)
    assert client_allowed(("::ffff:10.1.2.3", 5000, 0, 0), nets)  # IPv4 on a dual-stack socket
    assert client_allowed(("fd12::1", 5000, 0, 0), nets)
    assert not client_allowed(("10.2.0.1", 5000), nets)
    assert not client_allowed(("not-an-address", 1), nets)
    assert client_allowed(("8.8.8.8", 1), ())  # no list: anyone


@pytest.mark.parametrize("override", [False, True], ids=["default", "cpu-override"])
def test_compose_publishes_the_mrd_port_on_localhost_unless_configured(override: bool) -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose not found: install the Debian package docker-compose (make deps)")
    files = ["-f", str(REPO / "docker-compose.yml")]
    if override:
        files += ["-f", str(REPO / "docker" / "compose.cpu.yml")]
    cmd = [exe, "--project-directory", str(REPO), *files, "config"]
    env = {k: v for k, v in os.environ.items() if k != "RECON_BIND"}
    default = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=True).stdout
    published = re.findall(r"^\s*- ([\d.]+):(\d+):\d+", default, re.M)
    assert published and all(host == "127.0.0.1" for host, _ in published), published
    assert ("127.0.0.1", "9002") in published
    env["RECON_BIND"] = "0.0.0.0"
    opened = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=True).stdout
    assert "0.0.0.0:9002:9002" in opened and "127.0.0.1:9090:9090" in opened
