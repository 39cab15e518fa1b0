"""Posterior samples through the stream server: image + SD series on the wire, model named in meta."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from recon_server.mrd import ismrmrd_io
from recon_server.mrd.replay import replay_file, stream_scan
from recon_server.recon import methods
from recon_server.service.config import ServiceConfig
from recon_server.service.server import StreamServer
from recon_server.service.worker import ReconWorker


@pytest.fixture
def dps_server(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StreamServer]:
    monkeypatch.setenv(methods.MODEL_DIR_ENV, str(tiny_model))
    worker = ReconWorker(diffusion=methods.DiffusionSettings(overrides={"dps-fast": {"steps": 2}}))
    config = ServiceConfig(port=0, default_method="dps-fast", socket_timeout_s=60)
    server = StreamServer(config, worker=worker)
    server.start()
    yield server
    server.stop()


def test_samples_give_an_sd_series_and_the_model_is_named(
    dps_server: StreamServer, flair_eval: Path, tmp_path: Path
) -> None:
    assert dps_server.address is not None
    host, port = dps_server.address
    result = replay_file(
        flair_eval / "sub-100" / "reference.h5",
        host=host,
        port=port,
        out_dir=tmp_path,
        samples=2,
        progress=False,
    )
    metas = [ismrmrd.Meta.deserialize(image.meta_xml) for image in result.images]
    roles = [meta["DataRole"] for meta in metas]
    assert roles == ["Image", "Image", "Quantitative", "Quantitative"]  # 2 slices + their SD maps
    assert {meta["ModelName"] for meta in metas} == {"tiny-flair"}
    assert {meta["ModelVersion"] for meta in metas} == {"0.0.1"}
    settings = json.loads(metas[0]["ReconSettings"])
    assert settings["samples"] == 2 and settings["nfe_per_slice"] == 2 * 2  # 2 steps per sample
    assert metas[2]["SeriesDescription"] != metas[0]["SeriesDescription"]
    assert "uncertainty (SD)" in metas[2]["SeriesDescription"]
    assert np.load(tmp_path / "images.npy").shape == np.load(tmp_path / "sd.npy").shape == (2, 64, 64)


@pytest.mark.parametrize("bad", [0, 33, "8", True])
def test_bad_sample_counts_are_refused_on_the_wire(
    dps_server: StreamServer, flair_eval: Path, tmp_path: Path, bad: object
) -> None:
    assert dps_server.address is not None
    host, port = dps_server.address
    raw = ismrmrd_io.read_raw(flair_eval / "sub-100" / "reference.h5")
    result = stream_scan(raw, host=host, port=port, options={"samples": bad}, progress=False)
    assert not result.images
    assert any(e.startswith("ERR ValueError: samples must be an integer in 1..32") for e in result.errors), (
        result.errors
    )
