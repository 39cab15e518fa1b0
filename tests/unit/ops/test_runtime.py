"""serve's ops runtime: model pre-load per backend (readiness, provider metric), spool gauges."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from recon_server.cli.runtime import ModelLoader, readiness_checks, spool_samples
from recon_server.dicom.config import DicomConfig, PacsDestination
from recon_server.dicom.spool import Spool
from recon_server.dpm.checkpoint import load_checkpoint
from recon_server.dpm.onnx import OnnxDenoiser, export_onnx
from recon_server.ops.service_metrics import REGISTRY, parse_exposition
from recon_server.service.config import AppConfig, ServiceConfig
from recon_server.service.worker import worker_for


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_model_loader_backends(backend: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    onnx_file = None
    if backend == "onnx":
        model, _ = load_checkpoint(tiny_checkpoint)
        onnx_file = export_onnx(model, tmp_path / "d.onnx", exporter="torchscript")
    app = AppConfig(service=ServiceConfig(model_dir=tiny_checkpoint, backend=backend, onnx_file=onnx_file))
    worker = worker_for(app.service)
    assert worker.diffusion.model_dir == tiny_checkpoint  # the diffusion methods use the configured model
    loader = ModelLoader(app, worker.use_denoiser).start()
    loader.wait(120)
    ok, detail = loader.check()
    assert ok, detail
    assert detail.startswith(f"loaded {tiny_checkpoint}")
    values = parse_exposition(REGISTRY.render())
    provider = "CPUExecutionProvider" if backend == "onnx" else "torch:cpu"
    assert values[f'recon_server_info{{backend="{backend}",provider="{provider}",version="0.1.0"}}'] == 1
    if backend == "onnx":
        assert isinstance(worker.diffusion.denoiser, OnnxDenoiser)  # the no-backprop samplers run on it
    worker.close()


def test_model_loader_reports_a_broken_model(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "card.json").write_text("{}")
    loader = ModelLoader(AppConfig(service=ServiceConfig(model_dir=broken))).start()
    loader.wait(60)
    ok, detail = loader.check()
    assert not ok and detail.startswith("failed:")


def test_spool_gauges_and_readiness(tmp_path: Path) -> None:
    dest = PacsDestination("pacs", "127.0.0.1", 104, "PACS")
    dicom = DicomConfig(output_dir=tmp_path / "out", spool_dir=tmp_path / "spool", destinations=(dest,))
    spool = Spool(dicom.spool_dir)
    spool.enqueue(b"x" * 10, series_uid="1.2.3", sop_uid="1.2.3.4", destinations=["pacs"])
    old = next((dicom.spool_dir / "pacs" / "pending").rglob("*.dcm"))
    stamp = time.time() - 120
    os.utime(old, (stamp, stamp))
    samples = {s.name: s.value for s in spool_samples(dicom.spool_dir, ["pacs"])}
    assert samples["recon_server_spool_pending_images"] == 1
    assert 119 <= samples["recon_server_spool_oldest_age_seconds"] < 600
    assert samples["recon_server_spool_quarantined_images"] == 0

    class Worker:
        pass

    app = AppConfig(dicom=dicom)
    checks = readiness_checks(app, worker=Worker(), sender=None, model=ModelLoader(app))
    assert set(checks) == {"recon_worker", "model", "dicom_output", "dicom_spool"}
    assert all(check()[0] for check in checks.values())
