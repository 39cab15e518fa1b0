"""Raw files from Debian's ismrmrd_generate_cartesian_shepp_logan (independent data + truth)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

TOOL = "ismrmrd_generate_cartesian_shepp_logan"


def generate(path: Path, *, matrix: int = 64, coils: int = 4, accel: int = 1, calib: int = 0) -> Path:
    if shutil.which(TOOL) is None:
        pytest.fail(f"{TOOL} not found: install the Debian package ismrmrd-tools (make deps)")
    cmd = [TOOL, "-m", str(matrix), "-c", str(coils), "-a", str(accel), "-n", "0.05", "-C", "-o", str(path)]
    if calib:
        cmd += ["-w", str(calib)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return path


def truth(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(|phantom| (ky, kx), csm (coils, ky, kx)) stored by the generator."""
    with h5py.File(path, "r") as f:
        ph = f["dataset/phantom"][0]
        csm = f["dataset/csm"][0]
    return np.abs(ph["real"] + 1j * ph["imag"]), csm["real"] + 1j * csm["imag"]


@pytest.fixture(scope="session")
def shepp_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("sl") / "full.h5")


@pytest.fixture(scope="session")
def shepp_accel2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("sl") / "accel2.h5", accel=2, calib=16)
