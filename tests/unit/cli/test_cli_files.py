"""What the commands leave on disk and on the terminal: prepare-data without temporary files after
a failure, titled previews, pacs-echo without a ResourceWarning."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recon_server.cli import demo
from recon_server.cli.main import main
from recon_server.research import preview


def _prepare(source: Path, out: Path) -> int:
    return main(
        ["prepare-data", "--source", "ismrmrd", str(source), "--out", str(out), "--contrast", "FLAIR"]
    )


def test_prepare_data_leaves_no_temporary_files_after_a_failure(
    shepp_full: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(shepp_full, inputs / "a.h5")
    out = tmp_path / "prepared"
    assert _prepare(inputs, out) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "prepared"]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "slices.npy"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # The first file is prepared (its slices written), the second is not ISMRMRD: the command
    # fails, --out keeps what it had, and nothing temporary stays beside or inside it.
    (inputs / "b.h5").write_text("not HDF5\n")
    capsys.readouterr()
    assert _prepare(inputs, out) == 2
    assert capsys.readouterr().err == (
        f"recon-server prepare-data: error: not an ISMRMRD raw file: {inputs / 'b.h5'} (not an HDF5 file)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "prepared"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    fresh = tmp_path / "fresh"
    assert _prepare(inputs, fresh) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "prepared"]


def test_titled_sheet_is_a_png_of_all_panels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    panels = [preview.Panel(rng.random((16, 16)), f"tile {k}") for k in range(5)]
    path = preview.write_titled_sheet(tmp_path / "sub" / "sheet.png", panels, columns=3, title="five")
    png = Image.open(path)
    assert png.format == "PNG" and png.size[0] > png.size[1] > 0
    with pytest.raises(ValueError, match="panels"):
        preview.write_titled_sheet(tmp_path / "none.png", [], columns=3, title="none")


def test_demo_preview_titles_name_method_slice_and_nrmse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    truth = rng.random((5, 24, 24)).astype(np.float32) + 1.0
    recon = truth + 0.05 * rng.standard_normal(truth.shape).astype(np.float32)
    seen: dict[str, object] = {}
    real = preview.write_titled_sheet

    def spy(path: Path, panels: list[preview.Panel], **kw: object) -> Path:
        seen.update(panels=panels, **kw)
        return real(path, panels, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(preview, "write_titled_sheet", spy)
    png, picks = demo.write_demo_preview(tmp_path / "preview.png", truth, recon, "cg-sense")
    assert picks == [0, 2, 4] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titles = [p.title for p in seen["panels"]]  # type: ignore[attr-defined]
    assert titles[:3] == ["truth, slice 0", titles[1], "5x |error|, slice 0"]
    assert all(
        t.startswith(f"cg-sense, slice {k}, NRMSE 0.0") for t, k in zip(titles[1::3], picks, strict=True)
    )
    assert seen["columns"] == 3 and "cg-sense" in str(seen["title"])


def test_pacs_echo_against_a_closed_port_warns_nothing(closed_port: int) -> None:
    base = [
        sys.executable,
        "-W",
        "error::ResourceWarning",
        "-X",
        "dev",
        "-m",
        "recon_server.cli",
        "pacs-echo",
    ]
    done = subprocess.run([*base, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "ResourceWarning" not in done.stderr, done.stderr
    args = ["--host", "127.0.0.1", "--port", str(closed_port), "--called-ae", "PACS", "--timeout", "3"]
    done = subprocess.run([*base, *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert "ResourceWarning" not in done.stderr and "unclosed" not in done.stderr, done.stderr
    pacs = f"pacs (RECONSRV -> PACS@127.0.0.1:{closed_port})"
    why = "TCP connection failed (Connection refused)"
    assert done.stderr == f"recon-server pacs-echo: error: cannot associate with {pacs}: {why}\n"
