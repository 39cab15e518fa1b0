"""The whole chain: simulated raw scan -> `recon-server serve` -> replay -> DICOM -> Orthanc."""

from __future__ import annotations

import io
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import ismrmrd
import numpy as np
import pydicom
import pytest

from recon_server.data import acquire
from recon_server.mrd.replay import replay_file

SLICES = 3


def _start_serve(args: list[str]) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "recon_server.cli", "serve", "--port", "0", "--no-http", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "MRD stream server on" in line:
            return proc, int(line.rsplit(":", 1)[1])
    proc.wait()
    raise AssertionError(f"serve exited with {proc.returncode} before listening")


def test_streamed_scan_reaches_the_pacs_as_a_valid_series(orthanc, poll, tmp_path: Path) -> None:
    config = acquire.SimulationConfig(
        contrast="FLAIR",
        matrix=64,
        slices=SLICES,
        coils=4,
        acceleration=2,
        lesions=True,
        center_fraction=0.25,
    )
    files = acquire.write_subject(acquire.simulate_subject(config, seed=5, index=0), tmp_path / "sub")
    dicom_dir = tmp_path / "dicom"
    server, port = _start_serve(
        ["--method", "zero-filled", "--dicom-dir", str(dicom_dir)]
        + ["--pacs", f"TESTPACS@127.0.0.1:{orthanc.dicom_port}", "--calling-ae", "RECONSRV"]
    )
    try:
        result = replay_file(
            files["raw"], host="127.0.0.1", port=port, out_dir=tmp_path / "replay", progress=False
        )
        assert not result.errors, result.errors
        assert len(result.images) == SLICES
        poll(lambda: len(orthanc.instances()) == SLICES, 60, f"{SLICES} instances in Orthanc")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        assert server.stdout is not None
        server.stdout.close()
    written = sorted(dicom_dir.glob("*/IM*.dcm"))
    assert len(written) == SLICES
    tool = shutil.which("dciodvfy")
    assert tool is not None, "dciodvfy missing: install the Debian package dicom3tools (make deps)"
    for path in written:
        report = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"
        local = pydicom.dcmread(path)
        instance = orthanc.lookup(local.SOPInstanceUID)
        assert instance is not None
        remote = pydicom.dcmread(io.BytesIO(orthanc.file(instance)))
        np.testing.assert_array_equal(remote.pixel_array, local.pixel_array)
        # The ISMRMRD image on the wire and the DICOM image carry the same description and window.
        image = result.images[int(local.InstanceNumber) - 1]
        meta = ismrmrd.Meta.deserialize(image.meta_xml)
        assert meta["SeriesDescription"] == local.SeriesDescription
        # DICOM stores scaled integers: its window is the wire window times the same scale.
        scale = float(local.pixel_array.max()) / float(image.data.max())
        assert float(local.WindowCenter) == pytest.approx(float(meta["WindowCenter"]) * scale, rel=0.01)
        assert float(local.WindowWidth) == pytest.approx(float(meta["WindowWidth"]) * scale, rel=0.01)
        assert local.SeriesDescription.endswith("[recon: zero-filled]")
        assert local.ImageType[2:4] == ["OTHER", "M"]
        assert list(local.ScanningSequence) == ["SE", "IR"] and float(local.InversionTime) > 1000
    # The spool is drained: every image was delivered and nothing is left pending.
    assert not list((dicom_dir / "spool").glob("*/pending/*/*.dcm"))
