"""The diffusion methods through pipeline.reconstruct on a tiny checkpoint: provenance, SD series."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from recon_server.dicom.writer import write_series
from recon_server.dpm.checkpoint import load_checkpoint, read_card, update_card_sampler_defaults
from recon_server.recon import methods, pipeline
from recon_server.research import evaluate


@pytest.fixture(scope="module")
def scan(flair_eval: Path):  # noqa: ANN201 - KSpaceScan
    return evaluate.undersample(evaluate.load_subject(flair_eval / "sub-100").scan, 4)


def test_registry_keeps_the_classical_methods_and_adds_the_samplers() -> None:
    for name in ("zero-filled", "cg-sense", "l1-wavelet", "dps", "dps-fast", "dps-warm"):
        assert name in methods.METHODS
    assert methods.METHODS["dps"].needs_model  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["dps", "dps-fast", "dps-warm"])
def test_diffusion_methods_run_through_the_pipeline(
    scan, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(methods.MODEL_DIR_ENV, str(tiny_model))
    diffusion = methods.DiffusionSettings(
        overrides={"dps": {"steps": 4}, "dps-fast": {"steps": 4}, "dps-warm": {"steps": 2}}
    )
    volume = pipeline.reconstruct(scan, method=name, diffusion=diffusion)
    assert volume.magnitude.shape == (2, 64, 64) and np.isfinite(volume.magnitude).all()
    prov = volume.provenance
    assert (prov.method, prov.model_name, prov.model_version) == (name, "tiny-flair", "0.0.1")
    s = prov.settings
    assert s["sampler"] == ("dps" if name == "dps" else "dds")
    assert s["nfe_per_slice"] == {"dps": 4, "dps-fast": 4, "dps-warm": 2}[name]
    assert s["weights_tuned"] is False  # the card's zeta entries are placeholders -> fallbacks
    if name == "dps":
        assert s["zeta"] == methods.FALLBACK_ZETA[4]
    for key in ("seconds_coils", "seconds_method", "seconds", "intensity_scale"):
        assert isinstance(s[key], float)
    assert volume.role == "image" and volume.image_type[0] == "ORIGINAL"


def test_several_samples_add_an_sd_series(scan, tiny_model: Path, tmp_path: Path) -> None:
    diffusion = methods.DiffusionSettings(model_dir=tiny_model, overrides={"dps-fast": {"steps": 3}})
    volumes = pipeline.reconstruct_all(scan, method="dps-fast", samples=3, diffusion=diffusion)
    assert len(volumes) == 2
    image, sd = volumes
    assert sd.role == "sd" and sd.series_index == image.series_index + pipeline.SD_SERIES_OFFSET
    assert sd.series_description == f"{image.series_description} uncertainty (SD)"
    assert sd.image_type == ["DERIVED", "SECONDARY", "OTHER", "SD"]
    assert (
        sd.magnitude.shape == image.magnitude.shape and (sd.magnitude >= 0).all() and sd.magnitude.max() > 0
    )
    assert image.provenance.settings["samples"] == 3
    # Both become valid MR DICOM series of their own (dciodvfy: no errors, no warnings).
    dciodvfy = shutil.which("dciodvfy")
    assert dciodvfy, "dciodvfy not found: install the Debian package dicom3tools (make deps)"
    numbers = []
    for volume in volumes:
        files = write_series(volume, tmp_path / "dicom")
        report = subprocess.run([dciodvfy, str(files[0])], capture_output=True, text=True, check=False)
        problems = [x for x in (report.stdout + report.stderr).splitlines() if "Error" in x or "Warning" in x]
        assert not problems, problems
        ds = pydicom.dcmread(files[0])
        numbers.append(int(ds.SeriesNumber))
        assert list(ds.ImageType)[:4] == volume.image_type
    assert numbers[1] == numbers[0] + pipeline.SD_SERIES_OFFSET
    assert "uncertainty (SD)" in str(pydicom.dcmread(files[0]).SeriesDescription)
    # A classical method has no posterior: one volume whatever is asked.
    assert len(pipeline.reconstruct_all(scan, method="zero-filled", samples=3)) == 1


def test_clear_errors_for_model_and_contrast(scan, tiny_model: Path, tmp_path: Path) -> None:
    diffusion = methods.DiffusionSettings(model_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="does not exist"):
        pipeline.reconstruct(scan, method="dps-fast", diffusion=diffusion)
    diffusion = methods.DiffusionSettings(model_dir=tiny_model, overrides={"dps-fast": {"steps": 2}})
    with pytest.raises(ValueError, match="'PD' is not a slot"):
        pipeline.reconstruct(evaluate.replace(scan, contrast="PD"), method="dps-fast", diffusion=diffusion)
    with pytest.raises(ValueError, match="needs the scan's contrast"):
        pipeline.reconstruct(evaluate.replace(scan, contrast=""), method="dps-fast", diffusion=diffusion)


def test_tuned_card_values_are_used_and_the_card_still_loads(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    defaults = dict(read_card(model).sampler_defaults)
    defaults.update(zeta_per_acceleration={"2": 0.5, "6": 3.0}, tuned=True)
    update_card_sampler_defaults(model, defaults)
    load_checkpoint(model)  # sha256 and architecture checks still pass
    card = read_card(model)
    dps = methods.METHODS["dps"]
    assert isinstance(dps, methods.DiffusionMethod)
    assert dps.spec(card, 2.0)[0].zeta == 0.5
    assert dps.spec(card, 5.0)[0].zeta == 3.0  # nearest in log R: 5 -> 6
    assert dps.spec(None, 4.0)[0].zeta == methods.FALLBACK_ZETA[4]
    # a whole schedule per R for the fast sampler (benchmarks/tune_sampler.py writes it)
    schedule = {
        "2": {"steps": 4, "warm_sigma": 0.2, "data_weight": 1.5, "warm_start": "l1-wavelet", "eta": 0.0}
    }
    defaults["dps_fast"] = {"tuned": True, "per_acceleration": {**schedule, "6": {"steps": 9}}}
    update_card_sampler_defaults(model, defaults)
    fast = methods.METHODS["dps-fast"]
    assert isinstance(fast, methods.DiffusionMethod)
    spec, tuned = fast.spec(read_card(model), 2.5)
    assert tuned and (spec.steps, spec.warm_sigma, spec.data_weight, spec.warm_start, spec.eta) == (
        4,
        0.2,
        1.5,
        "l1-wavelet",
        0.0,
    )
    assert fast.spec(read_card(model), 5.0)[0].steps == 9


class _PlainDenoiser:
    """A non-torch-module denoiser with the EDMDenoiser call signature (as the ONNX backend has)."""

    def __init__(self, path: Path) -> None:
        self.model, _ = load_checkpoint(path)
        self.contrast_slots = self.model.contrast_slots
        self.calls = 0

    def contrast_index(self, name: str) -> int:
        return self.model.contrast_index(name)

    def __call__(self, x, sigma, labels):  # noqa: ANN001, ANN204
        self.calls += 1
        with torch.no_grad():
            return self.model(x, sigma, labels)


def test_an_injected_backend_runs_the_no_backprop_samplers(scan, tiny_model: Path) -> None:
    plain = _PlainDenoiser(tiny_model)
    diffusion = methods.DiffusionSettings(
        model_dir=tiny_model, denoiser=plain, overrides={"dps-fast": {"steps": 3}}
    )
    volume = pipeline.reconstruct(scan, method="dps-fast", diffusion=diffusion)
    assert plain.calls == 3 and volume.provenance.model_name == "tiny-flair"  # card of the model dir
    with pytest.raises(ValueError, match="needs the torch backend"):
        pipeline.reconstruct(scan, method="dps", diffusion=diffusion)
