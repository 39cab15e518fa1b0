"""ONNX Runtime vs torch for the preconditioned denoiser: every checkpoint that exists here (always
a tiny test model; models/flair-stroke-demo as soon as it is shipped), batch and matrix sizes."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recon_server.dpm.checkpoint import load_checkpoint
from recon_server.dpm.onnx import Denoiser, OnnxDenoiser, export_onnx, load_denoiser

from .conftest import SHIPPED_MODEL

TOLERANCE = 1e-3  # relative error, float32
CHECKPOINTS = ["tiny"] + (["flair-stroke-demo"] if (SHIPPED_MODEL / "card.json").is_file() else [])


@pytest.fixture(scope="session", params=CHECKPOINTS)
def exported(request: pytest.FixtureRequest, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """(torch model, OnnxDenoiser, checkpoint dir) exported once per session with the default
    (torch.export-based) exporter."""
    ckpt = tiny_checkpoint if request.param == "tiny" else SHIPPED_MODEL
    model, card = load_checkpoint(ckpt)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "denoiser.onnx", name=card.name)
    return model, OnnxDenoiser(path), ckpt


@pytest.mark.parametrize(
    ("batch", "size"), [(1, (32, 32)), (3, (32, 32)), (1, (48, 40)), (3, (48, 40)), (3, (33, 27))]
)
def test_onnx_matches_torch(exported, batch: int, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    model, onnx_model, _ = exported
    gen = torch.Generator().manual_seed(batch * 1000 + size[0])
    x = torch.randn(batch, 2, *size, generator=gen)
    # one noise level per batch item, 0.01 .. 10 (a single item: 1, where the network term is large)
    sigma = torch.logspace(-2, 1, batch) if batch > 1 else torch.ones(1)
    slots = model.contrast_slots
    labels = [slots[i % len(slots)] for i in range(batch)]
    with torch.no_grad():
        ref = model(x, sigma, labels)
        skip_part = model(x, sigma, labels) - ref  # zero; keeps shapes honest below
    got = onnx_model(x, sigma, labels)
    assert got.shape == ref.shape == x.shape and got.dtype == torch.float32
    rel = float((got - ref).norm() / ref.norm())
    assert rel < TOLERANCE, rel
    # The network term must matter, or the comparison would only test c_skip * x.
    c_skip = 0.25 / (sigma**2 + 0.25)
    net_term = ref - c_skip.reshape(-1, 1, 1, 1) * x
    assert float(net_term.norm() / ref.norm()) > 0.05
    assert float((got - ref - skip_part).norm() / net_term.norm()) < TOLERANCE


def test_labels_in_every_form_and_errors(exported) -> None:  # type: ignore[no-untyped-def]
    model, onnx_model, _ = exported
    x = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    name = model.contrast_slots[-1]
    idx = len(model.contrast_slots) - 1
    onehot = torch.zeros(2, len(model.contrast_slots))
    onehot[:, idx] = 1
    outs = [onnx_model(x, 0.7, lab) for lab in (name, idx, [name, name], torch.tensor([idx, idx]), onehot)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])
    with pytest.raises(ValueError, match="not a slot of this model"):
        onnx_model(x, 0.7, "PD")
    with pytest.raises(ValueError, match="sigma must be positive"):
        onnx_model(x, torch.tensor([0.5, 0.0]), name)
    with pytest.raises(ValueError, match=r"x must be \(B, 2, H, W\)"):
        onnx_model(x[:, :1], 0.5, name)
    assert isinstance(onnx_model, Denoiser) and isinstance(model, Denoiser)
    assert onnx_model.contrast_slots == model.contrast_slots


def test_provider_logged_and_cuda_fallback_warned(exported, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    _, onnx_model, _ = exported
    assert onnx_model.providers[0] in ort.get_available_providers()
    caplog.set_level(logging.INFO, logger="recon_server.dpm.onnx")
    cuda = OnnxDenoiser(onnx_model.path, device="cuda")
    assert any("providers" in r.getMessage() for r in caplog.records)
    if cuda.providers == ["CPUExecutionProvider"]:  # no usable CUDA libraries here
        assert any(r.levelno == logging.WARNING and "CPU only" in r.getMessage() for r in caplog.records)
    else:
        assert cuda.provider == "CUDAExecutionProvider"
    with pytest.raises(ValueError, match="not available here"):
        OnnxDenoiser(onnx_model.path, providers=["NoSuchExecutionProvider"])


def test_load_denoiser_backends_and_stale_export(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from .conftest import tiny_model

    torch_model = load_denoiser(tiny_checkpoint, backend="torch")
    assert not isinstance(torch_model, OnnxDenoiser)
    with pytest.raises(FileNotFoundError):
        load_denoiser(tiny_checkpoint, backend="onnx", onnx_file=tmp_path / "missing.onnx")
    other = tiny_model()
    other.add_contrast_slot("PD")
    stale = export_onnx(other, tmp_path / "stale.onnx", exporter="torchscript")
    with pytest.raises(ValueError, match="re-export"):
        load_denoiser(tiny_checkpoint, backend="onnx", onnx_file=stale)


def test_export_onnx_command_torchscript(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.onnx"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "recon_server.cli.main",
            "export-onnx",
            "--model",
            str(tiny_checkpoint),
            "--out",
            str(out),
            "--exporter",
            "torchscript",
            "--check-size",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "relative error" in result.stdout and out.is_file()
    model = load_denoiser(tiny_checkpoint, backend="onnx", onnx_file=out)
    assert isinstance(model, OnnxDenoiser) and model.model_name == "tiny-test"
