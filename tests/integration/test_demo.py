"""`make demo` end to end at a small size: simulate -> serve -> replay -> quality -> DICOM -> PNG."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from recon_server.cli.main import main


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    rc = main(
        ["demo", "--out", str(out), "--matrix", "96", "--coils", "4", "--slices", "2", "--method", "cg-sense"]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    pattern = r"^\| (zero-filled|l1-wavelet|cg-sense \(server\)) \| ([0-9.]+) \|"
    rows = dict(re.findall(pattern, printed, flags=re.M))
    assert set(rows) == {"zero-filled", "l1-wavelet", "cg-sense (server)"}, printed
    assert float(rows["cg-sense (server)"]) < float(rows["zero-filled"])  # the reconstruction helps
    assert "dciodvfy: 0 errors in 2 files" in printed
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
