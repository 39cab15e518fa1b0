"""pipeline.reconstruct_all's fallback: which failures fall back, the marking, the metric."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recon_server.dpm.checkpoint import CheckpointError
from recon_server.mrd import ismrmrd_io
from recon_server.mrd.assemble import assemble
from recon_server.ops import service_metrics as ops_metrics
from recon_server.recon import methods, pipeline
from recon_server.scan import KSpaceScan
from recon_server.service.worker import ReconWorker


@pytest.fixture(scope="module")
def scan(shepp_full: Path) -> KSpaceScan:
    raw = ismrmrd_io.read_raw(shepp_full)
    (scan,) = assemble(raw.header_xml, list(zip(raw.acquisition_headers, raw.data, strict=True)))
    return scan


def _raising(exc: BaseException):  # type: ignore[no-untyped-def]
    def method(problem: methods.ReconProblem) -> torch.Tensor:
        raise exc

    return method


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out-of-memory"),
        (MemoryError(), "out-of-memory"),
        (RuntimeError("Found no NVIDIA driver on your system"), "cuda-unavailable"),
        (RuntimeError("Torch not compiled with CUDA enabled"), "cuda-unavailable"),
        (RuntimeError("shapes do not match"), "error"),
        (RuntimeError("CUDA driver version is insufficient"), "cuda-unavailable"),
        (ValueError("model directory /x does not exist"), "model-missing"),
        (CheckpointError("sha256 of w.safetensors does not match the card"), "model-missing"),
        (FileNotFoundError("denoiser.onnx"), "model-missing"),
        (ValueError("method 'dps' needs the scan's contrast"), "error"),
    ],
)
def test_failure_class(exc: BaseException, reason: str) -> None:
    assert pipeline.failure_class(exc) == reason


def test_a_failing_method_falls_back_and_is_marked(scan: KSpaceScan, monkeypatch: pytest.MonkeyPatch) -> None:
    boom = torch.OutOfMemoryError("CUDA out of memory.\nTried to allocate 2.00 GiB")
    monkeypatch.setitem(methods.METHODS, "boom", _raising(boom))
    labels = {"method": "boom", "fallback": "cg-sense", "reason": "out-of-memory"}
    before = ops_metrics.REGISTRY.value("recon_server_fallbacks_total", **labels)
    (volume,) = pipeline.reconstruct_all(scan, method="boom", fallback="cg-sense")
    prov = volume.provenance
    assert prov.method == "cg-sense"
    assert prov.settings["fallback_from"] == "boom"
    reason = prov.settings["fallback_reason"]
    assert reason == "out-of-memory: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert volume.series_description.endswith(" (fallback: cg-sense)")
    assert pipeline.fallback_note(prov) == f"boom -> cg-sense: {reason}"
    assert ops_metrics.REGISTRY.value("recon_server_fallbacks_total", **labels) == before + 1
    direct = pipeline.reconstruct(scan, method="cg-sense")
    assert pipeline.fallback_note(direct.provenance) == ""
    torch.testing.assert_close(torch.from_numpy(volume.magnitude), torch.from_numpy(direct.magnitude))


def test_no_fallback_raises_and_both_failing_names_both(
    scan: KSpaceScan, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(methods.METHODS, "boom", _raising(RuntimeError("kaput")))
    monkeypatch.setitem(methods.METHODS, "boom2", _raising(ValueError("also kaput")))
    with pytest.raises(RuntimeError, match="kaput"):
        pipeline.reconstruct_all(scan, method="boom")
    with pytest.raises(RuntimeError, match="kaput"):
        pipeline.reconstruct_all(scan, method="boom", fallback="boom")
    with pytest.raises(pipeline.FallbackFailed) as info:
        pipeline.reconstruct_all(scan, method="boom", fallback="boom2")
    text = str(info.value)
    assert "method boom failed (error: RuntimeError: kaput)" in text
    assert "the fallback boom2 failed too: ValueError: also kaput" in text
    with pytest.raises(ValueError, match="unknown reconstruction method 'nope'"):
        pipeline.reconstruct_all(scan, method="nope", fallback="cg-sense")  # not a method failure


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_without_cuda_falls_back_on_the_cpu(scan: KSpaceScan) -> None:
    (volume,) = pipeline.reconstruct_all(scan, method="zero-filled", device="cuda", fallback="cg-sense")
    assert volume.provenance.method == "cg-sense"
    assert str(volume.provenance.settings["fallback_reason"]).startswith("cuda-unavailable: RuntimeError: ")


def test_worker_uses_its_fallback(scan: KSpaceScan, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(methods.METHODS, "boom", _raising(RuntimeError("kaput")))
    worker = ReconWorker(fallback="zero-filled")
    off = ReconWorker(fallback=None)
    try:
        (volume,) = worker.submit(scan, "boom").result(timeout=60)
        assert volume.provenance.method == "zero-filled"
        with pytest.raises(RuntimeError, match="kaput"):
            off.submit(scan, "boom").result(timeout=60)
    finally:
        worker.close()
        off.close()
