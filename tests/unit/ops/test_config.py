"""The TOML configuration: the shipped example passes, every kind of bad field is refused by name."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from recon_server.cli.main import build_parser, main
from recon_server.cli.serve import serve_config
from recon_server.recon.methods import METHODS
from recon_server.service.config import ConfigError
from recon_server.service.config_file import load_config

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "docker" / "recon-server.toml"
# The diffusion samplers register themselves in METHODS when their module lands; until then
# stand-ins keep the "method needs a model" cases meaningful.
KNOWN = {"dps": object(), "dps-fast": object(), **METHODS}


def test_example_config_passes_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "PACS orthanc (RECONSRV -> ORTHANC@orthanc:4242)" in out
    app = load_config(EXAMPLE, known_methods=METHODS)
    assert app.service.host == "0.0.0.0" and app.service.gadgetron_port == 18000
    assert app.dicom is not None and app.dicom.destinations[0].called_ae == "ORTHANC"
    assert app.ops.log_format == "json"


def test_config_check_exit_code_and_message_from_the_console_script(write_config) -> None:  # type: ignore[no-untyped-def]
    bad = write_config("[server]\nport = 70000\n")
    result = subprocess.run(
        [sys.executable, "-m", "recon_server.cli", "config", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "server.port" in result.stderr and "70000" in result.stderr


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("[server]\nprot = 9002\n", "server.prot", "unknown field"),
        ("[server]\nport = 70000\n", "server.port", "port must be an integer in 0..65535"),
        ("[server]\nport = '9002'\n", "server.port", "must be an integer"),
        ("[server]\ndevice = 'gpu'\n", "server.device", "device must be"),
        ("[server.limits]\nmax_channels = -1\n", "server.limits.max_channels", "must be a positive"),
        ("[recon]\ndefault_method = 'magic'\n", "recon.default_method", "unknown reconstruction method"),
        ("[recon.methods]\nFLAIR = 'dps'\n", "recon.model_dir", "required by method(s) ['dps']"),
        ("[recon]\nmodel_dir = 'nowhere'\n", "recon.model_dir", "not a checkpoint directory"),
        ("[recon]\nbackend = 'tensorflow'\n", "recon.backend", "backend must be one of"),
        ("[ops]\nlog_format = 'xml'\n", "ops.log_format", "must be one of"),
        ("[ops]\nhttp_port = 99999\n", "ops.http_port", "0..65535"),
        ("[extra]\nx = 1\n", "extra", "unknown section"),
        ("[dicom]\nspool_dir = 'x'\n", "dicom.output_dir", "missing"),
        ("[dicom]\noutput_dir = 'o'\nuid_root = '1.2.03.'\n", "dicom.uid_root", "leading zeros"),
        (
            "[dicom]\noutput_dir='o'\n[[dicom.destinations]]\nname='p'\nhost='h'\nport=104\n"
            "called_ae='THIS_AE_IS_FAR_TOO_LONG'\n",
            "dicom.destinations[0]",
            "called_ae",
        ),
        (
            "[dicom]\noutput_dir='o'\n[[dicom.destinations]]\nname='p'\nhost='h'\nport=0\ncalled_ae='P'\n",
            "dicom.destinations[0]",
            "port 0 must be an integer 1..65535",
        ),
        (
            "[dicom]\noutput_dir='o'\n[[dicom.destinations]]\nname='p'\nhost='h'\nport=104\n",
            "dicom.destinations[0].called_ae",
            "missing",
        ),
        (
            "[dicom]\noutput_dir='o'\n[[dicom.destinations]]\nname='p'\nhost='h'\nport=104\ncalled_ae='P'\n"
            "[dicom.destinations.tls]\nca_file='missing-ca.pem'\n",
            "dicom.destinations[0].tls.ca_file",
            "file not found",
        ),
        ("[server\n", "", "not valid TOML"),
    ],
)
def test_bad_fields_are_named(write_config, text: str, field: str, words: str) -> None:  # type: ignore[no-untyped-def]
    path = write_config(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, known_methods=KNOWN, environ={})
    message = str(info.value)
    assert message.startswith(f"{path}: {field}"), message
    assert words in message, message


def test_model_dir_and_onnx_backend(write_config, tiny_checkpoint: Path) -> None:  # type: ignore[no-untyped-def]
    ok = write_config(f"[recon]\nmodel_dir = '{tiny_checkpoint}'\n[recon.methods]\nFLAIR = 'dps'\n")
    app = load_config(ok, known_methods={**METHODS, "dps": object()})
    assert app.service.model_dir == tiny_checkpoint
    onnx = write_config(f"[recon]\nmodel_dir = '{tiny_checkpoint}'\nbackend = 'onnx'\n")
    with pytest.raises(ConfigError, match=r"recon.model_dir: onnx_file .*denoiser.onnx not found"):
        load_config(onnx, known_methods=METHODS)


def test_tls_paths_from_the_environment(write_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    text = (
        "[dicom]\noutput_dir='o'\n[[dicom.destinations]]\nname='main-pacs'\nhost='h'\nport=104\n"
        "called_ae='P'\n[dicom.destinations.tls]\nca_file='from-file.pem'\n"
    )
    path = write_config(text)
    # A readable but invalid CA file: the override is applied (the file-level path is never
    # opened) and the loader refuses what does not load as TLS material, naming the field.
    fake = tmp_path / "ca-from-env.pem"
    fake.write_text("not a certificate")
    env = {"RECON_SERVER_TLS_MAIN_PACS_CA_FILE": str(fake)}
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env)
    assert "dicom.destinations[0].tls" in str(info.value) and "TLS files do not load" in str(info.value)
    env_key = {"RECON_SERVER_TLS_KEY_FILE": str(fake)}  # key without a certificate: refused by TlsConfig
    with pytest.raises(ConfigError, match="cert_file and key_file must be given together"):
        load_config(path, environ=env_key)


def _serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_command_line_overrides_the_file(write_config) -> None:  # type: ignore[no-untyped-def]
    path = write_config(
        "[server]\nport = 9100\ndevice = 'cpu'\n[recon]\ndefault_method = 'zero-filled'\n"
        "[recon.methods]\nT1 = 'cg-sense'\n[ops]\nhttp_port = 9191\n"
    )
    app = serve_config(_serve_args("--config", str(path)))
    assert (app.service.port, app.service.default_method, app.ops.http_port) == (9100, "zero-filled", 9191)
    app = serve_config(
        _serve_args("--config", str(path), "--port", "9200", "--method-for", "flair=l1-wavelet", "--no-http")
    )
    assert app.service.port == 9200 and app.ops.http_port is None
    assert app.service.methods == {"T1": "cg-sense", "FLAIR": "l1-wavelet"}
    default = serve_config(_serve_args())
    assert (default.service.port, default.service.host, default.ops.http_host) == (
        9002,
        "127.0.0.1",
        "127.0.0.1",
    )
    with pytest.raises(ValueError, match="unknown reconstruction method"):
        serve_config(_serve_args("--method", "nope"))
