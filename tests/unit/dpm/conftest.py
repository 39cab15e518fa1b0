"""Fixtures for the diffusion-prior tests: tiny models and toy slice sets, CPU only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from recon_server.training.trainset import TensorSliceSet, write_npy_slice_set

CONTRAST_LEVELS = {"T1": 0.3, "T2": 0.8, "T1POST": 0.5, "FLAIR": 0.65}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The test machine's 2 cores are shared by several jobs: one intra-op thread is both faster and
    # far less noisy than oversubscribed OpenMP threads for these tiny models.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_images(contrasts: dict[str, int], *, size: int = 16, slices: int = 4, seed: int = 0) -> tuple:
    """Complex disks with a smooth phase; ``{contrast: n_subjects}`` -> (images, contrasts, subjects)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    images, labels, subjects = [], [], []
    for name, n_subjects in contrasts.items():
        level = CONTRAST_LEVELS.get(name, 0.5)
        for s in range(n_subjects):
            radius = 0.55 + 0.1 * rng.standard_normal()
            for k in range(slices):
                body = (xx**2 + yy**2) < radius**2
                texture = level + 0.15 * np.sin(3 * xx + 0.7 * k) * np.cos(2 * yy)
                images.append(body * texture * np.exp(1j * (0.4 * yy + 0.1 * s)))
                labels.append(name)
                subjects.append(f"{name}-s{s:02d}")
    return np.asarray(images, dtype=np.complex64), labels, subjects


@pytest.fixture
def toy_set() -> TensorSliceSet:
    images, labels, subjects = toy_images({"T1": 3, "T2": 3})
    return TensorSliceSet(torch.from_numpy(images), labels, subjects, description="toy disks")


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, labels, subjects = toy_images({"T1": 4, "T2": 4, "T1POST": 4, "FLAIR": 6})
    return write_npy_slice_set(tmp_path_factory.mktemp("slices"), images, labels, subjects, description="toy")


@pytest.fixture
def make_toy():  # noqa: ANN201 (returns toy_images)
    """The toy-image factory, for tests that need their own contrasts or sizes."""
    return toy_images
