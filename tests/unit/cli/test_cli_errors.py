"""Errors of ``recon-server``: once, on one line, ``recon-server COMMAND: error: WHAT`` naming what
failed (file, host:port, option), exit code 2; no raw h5py or socket text."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from recon_server.cli.main import error_text, main
from recon_server.mrd import ismrmrd_io


def _no_error_logged(caplog: pytest.LogCaptureFixture) -> None:
    # The message is printed; logging it as well put it on the terminal twice.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_recon_on_hdf5_without_header_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "some.h5"
    with h5py.File(path, "w") as f:
        f.create_group("dataset")
    assert main(["recon", str(path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"recon-server recon: error: not an ISMRMRD raw file: {path} (no /dataset/xml)\n"
    )
    _no_error_logged(caplog)
    assert not (tmp_path / "out").exists()


def test_recon_on_a_file_that_is_not_hdf5(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.h5"
    path.write_text("not HDF5 at all\n")
    assert main(["recon", str(path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"recon-server recon: error: not an ISMRMRD raw file: {path} (not an HDF5 file)\n"
    )


def test_recon_on_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing.h5"
    assert main(["recon", str(path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"recon-server recon: error: no such file: {path}\n"


def test_every_reader_of_raw_files_says_the_same(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=[1])
    for read in (ismrmrd_io.read_raw, ismrmrd_io.read_header_xml):
        with pytest.raises(ValueError, match=r"^not an ISMRMRD raw file: .*other\.h5 \(no /dataset/xml\)$"):
            read(path)
    header_only = tmp_path / "header-only.h5"
    with h5py.File(header_only, "w") as f:
        xml = f.create_dataset("dataset/xml", shape=(1,), dtype=h5py.vlen_dtype(bytes))
        xml[0] = b"<ismrmrdHeader/>"
    with pytest.raises(
        ValueError, match=r"^not an ISMRMRD raw file: .*header-only\.h5 \(no /dataset/data\)$"
    ):
        ismrmrd_io.read_raw(header_only)


def test_replay_without_a_server_names_host_and_port(
    minimal_raw: Path,
    closed_port: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    argv = ["replay", str(minimal_raw), "--port", str(closed_port), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"recon-server replay: error: cannot connect to 127.0.0.1:{closed_port}: connection refused\n"
    )
    _no_error_logged(caplog)


def test_replay_on_a_bad_file_fails_before_connecting(
    tmp_path: Path, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "x.h5"
    path.write_bytes(b"\x00" * 64)
    assert main(["replay", str(path), "--port", str(closed_port), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        f"recon-server replay: error: not an ISMRMRD raw file: {path} (not an HDF5 file)\n"
    )


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "recon_server.cli", "serve", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def test_serve_names_the_http_port_in_use(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        done = _serve("--port", "0", "--http-port", str(port))
    assert done.returncode == 2, done.stderr
    line = f"recon-server serve: error: port {port} is in use (health/metrics)"
    assert done.stderr.splitlines().count(line) == 1, done.stderr
    assert "Errno" not in done.stderr and "Traceback" not in done.stderr


def test_serve_names_the_stream_port_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        done = _serve("--port", str(port), "--no-http")
    assert done.returncode == 2, done.stderr
    line = f"recon-server serve: error: port {port} is in use (MRD stream server)"
    assert done.stderr.splitlines().count(line) == 1, done.stderr


def test_os_errors_name_the_file_without_python_noise() -> None:
    assert error_text(FileNotFoundError(2, "No such file or directory", "a/b.toml")) == (
        "a/b.toml: no such file or directory"
    )
    assert error_text(ValueError("first line\n  second line")) == "first line second line"


def test_bad_option_values_are_one_line_naming_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["replay", "x.h5", "--out", "o", "--port", "70000"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "recon-server replay: error: argument --port: port must be in 0..65535, got 70000" in err
