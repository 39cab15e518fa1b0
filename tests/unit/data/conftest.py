"""Session fixtures for the data-area unit tests: small simulated subjects, written once."""

from __future__ import annotations

from pathlib import Path

import pytest

from recon_server.data import acquire

SMALL = {"matrix": 64, "slices": 3, "coils": 4, "acceleration": 4, "center_fraction": 0.2}


@pytest.fixture(scope="session")
def small_config() -> acquire.SimulationConfig:
    return acquire.SimulationConfig(contrast="FLAIR", lesions=True, lesion_count=2, **SMALL)


@pytest.fixture(scope="session")
def small_subject(small_config: acquire.SimulationConfig) -> acquire.SimulatedSubject:
    return acquire.simulate_subject(small_config, seed=11, index=0)


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory: pytest.TempPathFactory, small_config: acquire.SimulationConfig) -> Path:
    """Two FLAIR subjects with lesions written as ``sim/sub-000``, ``sim/sub-001``."""
    root = tmp_path_factory.mktemp("data") / "sim"
    for index in range(2):
        subject = acquire.simulate_subject(small_config, seed=11, index=index)
        acquire.write_subject(subject, root / subject.subject_id)
    return root
