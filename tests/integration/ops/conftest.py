"""A small raw file with a measurement id (Debian ismrmrd tools), and a running ``serve``."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from recon_server.mrd import ismrmrd_io

TOOL = "ismrmrd_generate_cartesian_shepp_logan"
MEASUREMENT_ID = "OPS_TEST_MEAS_42"
NOISE_FLAG = 19  # ISMRMRD ACQ_IS_NOISE_MEASUREMENT (bit numbers start at 1)


@pytest.fixture(scope="session")
def raw_with_id(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shepp-Logan (48x48, 4 coils, noise scan) from the Debian generator, undersampled here to
    every other line outside 12 fully sampled central lines (R ~ 1.6, an ACS block the diffusion
    samplers find), with a measurement id and a FLAIR protocol name in the header."""
    if shutil.which(TOOL) is None:
        pytest.fail(f"{TOOL} not found: install the Debian package ismrmrd-tools (make deps)")
    tmp = tmp_path_factory.mktemp("ops-raw")
    full = tmp / "full.h5"
    cmd = [TOOL, "-m", "48", "-c", "4", "-a", "1", "-n", "0.05", "-C", "-o", str(full)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    raw = ismrmrd_io.read_raw(full)
    info = (
        f"<measurementInformation><measurementID>{MEASUREMENT_ID}</measurementID>"
        "<patientPosition>HFS</patientPosition><protocolName>AX_FLAIR_OPS</protocolName>"
        "</measurementInformation>"
    )
    pattern = r"(<(acquisitionSystemInformation|experimentalConditions)>)"
    xml, n = re.subn(pattern, info + r"\1", raw.header_xml, count=1)
    assert n == 1, "unexpected header layout"
    heads = raw.acquisition_headers
    ky = heads["idx"]["kspace_encode_step_1"].astype(int)
    noise = (heads["flags"].astype(np.uint64) & np.uint64(1 << (NOISE_FLAG - 1))) != 0
    keep = noise | (ky % 2 == 0) | (np.abs(ky - 24) < 6)
    path = tmp / "scan.h5"
    ismrmrd_io.write_raw(path, xml, heads[keep], [d for d, k in zip(raw.data, keep, strict=True) if k])
    return path


@dataclass
class Served:
    mrd: tuple[str, int]
    http: str
    log_path: Path
    proc: subprocess.Popen


def _addresses(proc: subprocess.Popen, log_path: Path) -> tuple[tuple[str, int], str]:
    """The MRD address and health URL a child ``serve`` prints on stdout (the test fails, with
    the end of its log, if it has not printed both within 120 s)."""
    assert proc.stdout is not None
    mrd = http = None
    deadline = time.monotonic() + 120
    while (mrd is None or http is None) and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if m := re.search(r"MRD stream server on ([\d.]+):(\d+)", line):
            mrd = (m.group(1), int(m.group(2)))
        if m := re.search(r"health and metrics on (http://[\d.]+:\d+)", line):
            http = m.group(1)
    if mrd is None or http is None:
        proc.kill()
        pytest.fail(f"serve did not start: {log_path.read_text()[-3000:]}")
    return mrd, http


@pytest.fixture(scope="session")
def serve_addresses() -> Callable[[subprocess.Popen, Path], tuple[tuple[str, int], str]]:
    """``serve_addresses(proc, log_path)``: see :func:`_addresses` (for tests that start ``serve``
    with options of their own)."""
    return _addresses


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``recon-server serve --config`` in a subprocess: free ports, JSON logs, DICOM output."""
    tmp = tmp_path_factory.mktemp("serve")
    config = tmp / "recon-server.toml"
    config.write_text(
        textwrap.dedent(
            """
            [server]
            port = 0
            socket_timeout_s = 60
            [recon]
            default_method = "zero-filled"
            [dicom]
            output_dir = "dicom"
            spool_dir = "spool"
            [ops]
            http_port = 0
            log_format = "json"
            """
        )
    )
    log_path = tmp / "serve.log"
    log_file = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "recon_server.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
    )
    mrd, http = _addresses(proc, log_path)
    try:
        yield Served(mrd=mrd, http=http, log_path=log_path, proc=proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log_file.close()
