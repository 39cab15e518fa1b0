"""``recon --backend onnx`` reproduces ``--backend torch`` (no-backprop sampler, same seed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recon_server.cli.main import main
from recon_server.dpm.checkpoint import save_checkpoint
from recon_server.dpm.unet import build_denoiser

REPO = Path(__file__).resolve().parents[3]
SHIPPED_MODEL = REPO / "models" / "flair-stroke-demo"
MODELS = ["tiny"] + (["flair-stroke-demo"] if (SHIPPED_MODEL / "card.json").is_file() else [])


def _tiny_checkpoint(out: Path) -> Path:
    # Perturbed weights so the network term matters (a fresh init is nearly D(x) = c_skip x).
    model = build_denoiser("tiny", ["T1", "T2", "FLAIR"], seed=5).eval()
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    save_checkpoint(model, out, name="tiny-backend-test")
    return out


def _recon(raw: Path, out: Path, model_dir: Path, backend: str, onnx: Path | None) -> np.ndarray:
    argv = ["recon", str(raw), "--out", str(out), "--method", "dps-fast", "--model-dir", str(model_dir)]
    argv += ["--backend", backend] + (["--onnx-file", str(onnx)] if onnx is not None else [])
    # The equivalence is about fp32 arithmetic: the torch side would otherwise pick bf16 where the
    # CPU runs it faster (--cpu-precision auto).
    assert main([*argv, "--cpu-precision", "fp32"]) == 0
    return np.load(out / "images.npy")


@pytest.mark.parametrize("model", MODELS)
def test_recon_onnx_backend_matches_torch(model: str, raw_with_id: Path, tmp_path: Path) -> None:
    model_dir = _tiny_checkpoint(tmp_path / "tiny") if model == "tiny" else SHIPPED_MODEL
    onnx = tmp_path / "denoiser.onnx"
    export = ["export-onnx", "--model", str(model_dir), "--out", str(onnx), "--exporter", "torchscript"]
    assert main(export) == 0
    ref = _recon(raw_with_id, tmp_path / "torch", model_dir, "torch", None)
    got = _recon(raw_with_id, tmp_path / "onnx", model_dir, "onnx", onnx)
    assert ref.shape == got.shape and ref.size > 0
    nrmse = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"recon dps-fast, {model}: NRMSE onnx vs torch = {nrmse:.2e}")
    assert nrmse < 1e-3, nrmse
