"""Fixtures of the ops tests: a tiny checkpoint with non-trivial weights, a config writer."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from recon_server.dpm.checkpoint import save_checkpoint
from recon_server.dpm.unet import EDMDenoiser, build_denoiser

REPO = Path(__file__).resolve().parents[3]
SHIPPED_MODEL = REPO / "models" / "flair-stroke-demo"


def tiny_model(seed: int = 0) -> EDMDenoiser:
    """A tiny denoiser whose network output matters: the fresh init has near-zero output
    convolutions (D ~ c_skip x), which would make any backend comparison trivially pass."""
    model = build_denoiser("tiny", ["T1", "T2", "FLAIR"], seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(tiny_model(), out, name="tiny-test", version="0.0.1")
    return out


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "recon-server.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write
