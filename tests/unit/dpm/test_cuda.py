"""GPU path (runs where a CUDA device exists): bf16 autocast training step, denoiser and sampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recon_server.dpm.unet import build_denoiser
from recon_server.training.config import TrainConfig
from recon_server.training.distributed import DistInfo
from recon_server.training.schedule import LRSchedule
from recon_server.training.train import train
from recon_server.training.trainset import TensorSliceSet
from recon_server.training.validation import validate

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_training_on_cuda(toy_set: TensorSliceSet, tmp_path: Path) -> None:
    model = build_denoiser("tiny", ["T1", "T2"], seed=0)
    cfg = TrainConfig(
        mode="pretrain",
        total_steps=6,
        global_batch=8,
        lr=LRSchedule(base_lr=1e-3, total_steps=6),
        log_every=3,
        val_every=6,
        progress=False,
    )
    info = DistInfo(device=torch.device("cuda"))
    summary = train(model, toy_set, config=cfg, out_dir=tmp_path / "run", val_set=toy_set, dist_info=info)
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    card = (tmp_path / "run" / "best" / "card.json").read_text()
    assert '"precision": "bf16 autocast"' in card
    x = toy_set.images[:4].cuda()
    with torch.no_grad():
        ref = model(x, 0.5, "T1")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x, 0.5, "T1")
    assert low.dtype == torch.float32
    assert float((low - ref).norm() / ref.norm()) < 2e-2
    m = validate(model, toy_set, max_slices=8)
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
