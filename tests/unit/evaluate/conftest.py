"""Session fixtures for the evaluation tests: tiny simulated FLAIR subjects and a tiny checkpoint.

64x64, 4 coils, 2 slices per subject (the first simulation in a process loads the anatomy seeds,
~15 s; every further subject takes ~0.1 s).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from recon_server.data import acquire
from recon_server.dpm.checkpoint import save_checkpoint
from recon_server.dpm.unet import build_denoiser
from recon_server.recon import methods

SIM = dict(matrix=64, slices=2, coils=4, acceleration=2, snr=40.0, readout_oversampling=1)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_model_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Tests name their own models (DiffusionSettings); the caller's environment must not.
    monkeypatch.delenv(methods.MODEL_DIR_ENV, raising=False)
    yield


def simulate(root: Path, contrast: str, count: int, *, first: int = 0, lesions: bool = False) -> Path:
    config = acquire.SimulationConfig(
        contrast=contrast, lesions=lesions, lesion_count=1 if lesions else None, **SIM
    )
    for index in range(first, first + count):
        subject = acquire.simulate_subject(config, seed=7, index=index)
        acquire.write_subject(subject, root / subject.subject_id, files=("reference", "truth", "labels"))
    return root


@pytest.fixture(scope="session")
def simulate_subjects() -> Callable[..., Path]:
    """:func:`simulate` for tests that need their own subjects."""
    return simulate


@pytest.fixture(scope="session")
def flair_eval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two held-out FLAIR subjects with one lesion each (indices 100, 101)."""
    return simulate(tmp_path_factory.mktemp("eval") / "flair", "FLAIR", 2, first=100, lesions=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny checkpoint with T1, T2 and FLAIR slots (placeholder sampler defaults)."""
    model = build_denoiser("tiny", ["T1", "T2", "FLAIR"], seed=3)
    path = tmp_path_factory.mktemp("models") / "tiny-flair"
    save_checkpoint(model, path, name="tiny-flair", version="0.0.1", notes="random weights (tests)")
    return path
