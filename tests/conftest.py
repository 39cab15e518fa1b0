"""Fixtures shared by every test folder: raw data from an independent generator.

Debian's ``ismrmrd_generate_cartesian_shepp_logan`` (package ismrmrd-tools) writes ISMRMRD raw
files with 2x readout oversampling, a noise scan, and its own ground truth (``phantom``, ``csm``):
data this project did not make, with the answer stored beside it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np
import pytest

SHEPP_LOGAN_TOOL = "ismrmrd_generate_cartesian_shepp_logan"


def generate_shepp_logan(
    path: Path, *, matrix: int = 64, coils: int = 4, accel: int = 1, calib: int = 0
) -> Path:
    """Run the Debian generator (noise 0.05, with a noise scan) and return ``path``."""
    if shutil.which(SHEPP_LOGAN_TOOL) is None:
        pytest.fail(f"{SHEPP_LOGAN_TOOL} not found: install the Debian package ismrmrd-tools (make deps)")
    cmd = [SHEPP_LOGAN_TOOL, "-m", str(matrix), "-c", str(coils), "-a", str(accel), "-n", "0.05", "-C"]
    if calib:
        cmd += ["-w", str(calib)]
    subprocess.run([*cmd, "-o", str(path)], check=True, capture_output=True, timeout=60)
    return path


def shepp_logan_truth(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(|phantom| (ky, kx), csm (coils, ky, kx)) stored by the generator beside the raw data."""
    with h5py.File(path, "r") as f:
        ph, csm = f["dataset/phantom"][0], f["dataset/csm"][0]
    return np.abs(ph["real"] + 1j * ph["imag"]), csm["real"] + 1j * csm["imag"]


@pytest.fixture(scope="session")
def shepp_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fully sampled 64x64, 4 coils."""
    return generate_shepp_logan(tmp_path_factory.mktemp("sl") / "full.h5")


@pytest.fixture(scope="session")
def shepp_accel2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2x undersampled with 16 interleaved calibration lines."""
    return generate_shepp_logan(tmp_path_factory.mktemp("sl") / "accel2.h5", accel=2, calib=16)


@pytest.fixture(scope="session")
def shepp_truth() -> Callable[[Path], tuple[np.ndarray, np.ndarray]]:
    """``shepp_truth(path) -> (|phantom|, csm)`` for a file from the generator."""
    return shepp_logan_truth


@pytest.fixture(scope="session")
def vol() -> ModuleType:
    """The DICOM test-volume factory (tests/unit/dicom/volumes.py), for unit and integration tests.

    Loaded by path: with --import-mode=importlib the test folders are not packages.
    """
    name = "recon_dicom_test_volumes"
    if name not in sys.modules:
        path = Path(__file__).parent / "unit" / "dicom" / "volumes.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
