"""An independent consumer (Debian ismrmrd-tools) reconstructs the simulator's reference.h5,
and the CLI end to end (simulate with preview, prepare-data)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

from recon_server.cli.main import main as cli_main
from recon_server.mrd.ismrmrd_io import read_images


def test_debian_recon_of_reference_matches_truth(tmp_path: Path, recon_tool: str) -> None:
    out = tmp_path / "sim"
    args = ["simulate", "--out", str(out), "--contrast", "T2", "--matrix", "64", "--coils", "4"]
    assert cli_main([*args, "--slices", "3", "--seed", "7", "--snr", "35", "--preview"]) == 0
    sub = out / "sub-000"
    copy = tmp_path / "reference_copy.h5"  # the tool appends its image to the file it reads
    shutil.copy(sub / "reference.h5", copy)
    run = subprocess.run([recon_tool, str(copy)], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Encoding Matrix Size        : [128, 64, 1]" in run.stdout
    (image,) = read_images(copy, name="cpp")  # ismrmrd-tools 1.8 writes group /dataset/cpp
    recon = np.asarray(image.data, dtype=np.float32).squeeze()
    assert recon.shape == (64, 64)
    # The tool fills one buffer by idx.kspace_encode_step_1 only, so the slice acquired last for
    # each line wins: slice 1 in the interleaved order 0, 2, 1. It combines coils by root sum of
    # squares; with sum_c |S_c|^2 = 1 that is |truth| (plus noise), up to the FFT scale.
    truth = np.abs(np.load(sub / "truth.npy")[1])
    scale = float((recon * truth).sum() / (truth * truth).sum())
    nrmse = float(np.linalg.norm(recon / scale - truth) / np.linalg.norm(truth))
    corr = float(np.corrcoef(recon.ravel(), truth.ravel())[0, 1])
    print(f"debian recon vs truth: corr {corr:.4f} nrmse {nrmse:.4f}")
    assert corr > 0.99 and nrmse < 0.08, (corr, nrmse)
    assert np.isclose(scale, np.sqrt(128 * 64), rtol=0.05)  # unnormalised FFTW backward transform
    # Preview contact sheet exists and is a PNG.
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_then_prepare_data_cli(tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    common = ["--matrix", "64", "--coils", "4", "--slices", "2", "--seed", "1", "--center-fraction", "0.2"]
    assert cli_main(["simulate", "--out", str(sim), "--subjects", "2", "--contrast", "T1POST", *common]) == 0
    assert sorted(p.name for p in (sim / "sub-001").iterdir()) == [
        "coil_weight.npy",
        "raw.h5",
        "reference.h5",
        "subject.json",
        "truth.npy",
    ]
    meta = json.loads((sim / "sub-001" / "subject.json").read_text())
    assert meta["contrast"] == "T1POST" and meta["gadolinium_mM"]
    prep = tmp_path / "prep"
    assert (
        cli_main(
            [
                "prepare-data",
                "--source",
                "simulated",
                str(sim),
                "--out",
                str(prep),
                "--center-fraction",
                "0.25",
            ]
        )
        == 0
    )
    data = np.load(prep / "slices.npy", mmap_mode="r")
    index = json.loads((prep / "index.json").read_text())
    assert data.shape == (4, 64, 64) and {r["contrast"] for r in index["slices"]} == {"T1POST"}
    assert (
        cli_main(["simulate", "--out", str(sim), "--contrast", "FLAIR", "--tr", "9000", "--ti", "9500"]) == 2
    )
