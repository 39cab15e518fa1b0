"""Fixtures for the data-area integration tests."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def recon_tool() -> str:
    """Debian's ``ismrmrd_recon_cartesian_2d`` (package ismrmrd-tools); a clear failure if missing."""
    path = shutil.which("ismrmrd_recon_cartesian_2d")
    if path is None:
        pytest.fail(
            "ismrmrd_recon_cartesian_2d not found: install the Debian package ismrmrd-tools (make deps)"
        )
    return path
