"""Container files: docker-compose accepts the compose file, the XML parses, and every
recon-server command and option the containers run exists in ``recon-server ... --help``."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from recon_server.cli.main import build_parser
from recon_server.recon.methods import METHODS
from recon_server.service.config_file import load_config

REPO = Path(__file__).resolve().parents[3]
COMPOSE = REPO / "docker-compose.yml"
CPU_OVERRIDE = REPO / "docker" / "compose.cpu.yml"
DOCKERFILE = REPO / "docker" / "recon-server.Dockerfile"
GADGETRON_DIR = REPO / "docker" / "gadgetron"


def _compose(*args: str) -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose not found: install the Debian package docker-compose (make deps)")
    result = subprocess.run(
        [exe, "--project-directory", str(REPO), *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def compose_config() -> dict:
    """The resolved compose file as docker-compose prints it, read as JSON by the Python that
    runs docker-compose (it ships PyYAML; the project's venv does not need it)."""
    exe = shutil.which("docker-compose")
    assert exe is not None
    shebang = Path(exe).read_text(errors="replace").splitlines()[0]
    python = shebang[2:].strip().split()[0] if shebang.startswith("#!") else "python3"
    to_json = "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"
    result = subprocess.run(
        [python, "-c", to_json], input=_compose("-f", str(COMPOSE), "config"), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return out.getvalue()


def _check_recon_server_command(argv: list[str]) -> None:
    """Subcommand known, every option in its --help, and the whole command line parses."""
    assert argv, "empty command"
    top = _help([])
    assert re.search(rf"\b{re.escape(argv[0])}\b", top), f"{argv[0]} not in recon-server --help"
    sub_help = _help(argv[:1])
    for token in argv[1:]:
        if token.startswith("--"):
            assert token.split("=", 1)[0] in sub_help, f"{token} not in recon-server {argv[0]} --help"
    build_parser().parse_args(argv)  # values valid too (choices, types)


def test_docker_compose_accepts_the_files() -> None:
    services = set(_compose("-f", str(COMPOSE), "config", "--services").split())
    assert services == {"orthanc", "gadgetron", "recon-server", "simulate", "replay"}
    cpu = _compose("-f", str(COMPOSE), "-f", str(CPU_OVERRIDE), "config")
    assert "recon-server-cpu" in cpu and "gpu-disabled" in cpu and "- recon-server" in cpu


def test_compose_wiring(compose_config: dict) -> None:
    svc = compose_config["services"]
    gpu = svc["recon-server"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    assert {"models", "recon-data", "orthanc-db", "replay-data"} <= set(compose_config["volumes"])
    mounts = " ".join(str(v) for v in svc["recon-server"]["volumes"])
    assert "/models" in mounts and "/var/lib/recon-server" in mounts and "recon-server.toml" in mounts
    assert svc["replay"]["depends_on"]["simulate"]["condition"] == "service_completed_successfully"
    # Every recon-server image command is a real CLI call (entrypoint is recon-server).
    for name in ("recon-server", "simulate"):
        _check_recon_server_command(list(svc[name]["command"]))
    cpu = CPU_OVERRIDE.read_text()
    cpu_cmd = json.loads(re.search(r"command: (\[.*\])", cpu).group(1))  # type: ignore[union-attr]
    _check_recon_server_command(cpu_cmd)
    # The replay streams the same file the simulate service writes.
    out_dir = svc["simulate"]["command"][svc["simulate"]["command"].index("--out") + 1]
    sim_mount = [v for v in svc["simulate"]["volumes"] if "replay-data" in str(v)][0]
    replay_mount = [v for v in svc["replay"]["volumes"] if "replay-data" in str(v)][0]
    target = sim_mount["target"] if isinstance(sim_mount, dict) else sim_mount.split(":")[1]
    replay_target = replay_mount["target"] if isinstance(replay_mount, dict) else replay_mount.split(":")[1]
    assert out_dir == target
    assert svc["replay"]["command"][0] == f"{replay_target}/sub-000/raw.h5"


def test_dockerfile_entry_and_healthcheck_match_the_cli_and_config() -> None:
    text = DOCKERFILE.read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    assert entry == ["recon-server"]
    _check_recon_server_command(cmd)
    config_path = cmd[cmd.index("--config") + 1]
    assert f"COPY docker/recon-server.toml {config_path}" in text
    app = load_config(REPO / "docker" / "recon-server.toml", known_methods=METHODS)
    health = re.search(r"curl -fsS http://127\.0\.0\.1:(\d+)/healthz", text)
    assert health and int(health.group(1)) == app.ops.http_port
    exposed = {int(p) for p in re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split()}  # type: ignore[union-attr]
    assert {app.service.port, app.service.gadgetron_port, app.ops.http_port} <= exposed
    assert app.service.host == "0.0.0.0" and app.service.gadgetron_host == "0.0.0.0"
    assert re.search(r"^USER recon$", text, re.M), "runs as root"
    assert "onnxruntime-gpu" in text


def test_gadgetron_configs_parse_and_point_at_recon_server(compose_config: dict) -> None:
    app = load_config(REPO / "docker" / "recon-server.toml", known_methods=METHODS)
    xmls = sorted(GADGETRON_DIR.glob("*.xml"))
    assert {p.name for p in xmls} >= {"recon_server_connect.xml", "recon_server_execute.xml"}
    for path in xmls:
        root = ET.parse(path).getroot()
        assert root.tag == "configuration"
        external = root.find("stream/external")
        assert external is not None, path
        method = external.find("configuration/property[@name='method']")
        assert method is not None and method.get("value") in METHODS
    connect = ET.parse(GADGETRON_DIR / "recon_server_connect.xml").getroot().find("stream/external/connect")
    assert connect is not None
    assert connect.get("address") == "recon-server" and "recon-server" in compose_config["services"]
    assert int(connect.get("port", "0")) == app.service.gadgetron_port
    execute = ET.parse(GADGETRON_DIR / "recon_server_execute.xml").getroot().find("stream/external/execute")
    assert execute is not None and execute.get("name") == "recon_server.service.gadget"
    gt_dockerfile = (GADGETRON_DIR / "Dockerfile").read_text()
    assert "FROM ghcr.io/gadgetron/gadgetron/ubuntu22.04_rt_cuda:latest" in gt_dockerfile
    assert "recon_server_connect.xml" in gt_dockerfile
    replay = (GADGETRON_DIR / "replay.sh").read_text()
    assert "-c recon_server_connect.xml" in replay


def test_orthanc_knows_the_calling_ae() -> None:
    app = load_config(REPO / "docker" / "recon-server.toml", known_methods=METHODS)
    orthanc = json.loads((REPO / "docker" / "orthanc" / "orthanc.json").read_text())
    assert app.dicom is not None
    dest = app.dicom.destinations[0]
    assert dest.called_ae == orthanc["DicomAet"] and dest.port == orthanc["DicomPort"]
    assert dest.host == "orthanc"
    assert dest.calling_ae in [m[0] for m in orthanc["DicomModalities"].values()]
    assert orthanc["DicomCheckCalledAet"] is True and orthanc["DicomAlwaysAllowStore"] is False
