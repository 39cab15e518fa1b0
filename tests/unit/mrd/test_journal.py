"""The scan journal: raw data on disk as it streams, removed once delivered, recovered at start."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from recon_server.mrd import ismrmrd_io
from recon_server.mrd.wire import Acquisition
from recon_server.service import journal as jr


def _acquisitions(path: Path) -> tuple[str, list[Acquisition]]:
    raw = ismrmrd_io.read_raw(path)
    empty = np.zeros((0, 0), dtype=np.float32)
    return raw.header_xml, [
        Acquisition(h, d, empty) for h, d in zip(raw.acquisition_headers, raw.data, strict=True)
    ]


def test_entry_streams_to_a_replayable_raw_file(shepp_full: Path, tmp_path: Path) -> None:
    header, acqs = _acquisitions(shepp_full)
    journal = jr.Journal(tmp_path / "journal")
    entry = journal.begin(header, measurement="M1")
    for acq in acqs[: jr.BATCH_ROWS + 3]:
        entry.append(acq)
    # A crash now leaves an entry in state "receiving" with the first batch on disk.
    assert json.loads(entry.record_path.read_text())["state"] == jr.RECEIVING
    for acq in acqs[jr.BATCH_ROWS + 3 :]:
        entry.append(acq)
    entry.seal(method="cg-sense", samples=None, options={"contrast": "FLAIR"})
    record = json.loads(entry.record_path.read_text())
    assert record["state"] == jr.RECEIVED and record["readouts"] == len(acqs)
    assert record["options"] == {"contrast": "FLAIR"} and record["method"] == "cg-sense"
    copy, original = ismrmrd_io.read_raw(entry.raw_path), ismrmrd_io.read_raw(shepp_full)
    assert copy.header_xml == header and len(copy) == len(original)
    assert all(np.array_equal(a, b) for a, b in zip(copy.data, original.data, strict=True))
    np.testing.assert_array_equal(copy.acquisition_headers, original.acquisition_headers)


def test_recover_reconstructs_received_and_fails_incomplete(shepp_full: Path, tmp_path: Path) -> None:
    header, acqs = _acquisitions(shepp_full)
    journal = jr.Journal(tmp_path / "journal", failed_dir=tmp_path / "failed")
    done = journal.begin(header, measurement="DONE")
    for acq in acqs:
        done.append(acq)
    done.seal(method="zero-filled", samples=None, options={})
    done.leave()
    partial = journal.begin(header, measurement="a/b\nc" + "x" * 300)  # hostile name
    for acq in acqs[: jr.BATCH_ROWS]:
        partial.append(acq)
    partial.leave()  # as a SIGKILL leaves it (the batch is written)
    released: list[str] = []
    fresh = jr.Journal(tmp_path / "journal", failed_dir=tmp_path / "failed", on_release=released.append)
    runs: list[tuple[int, str]] = []

    def run(scans, entry) -> None:  # type: ignore[no-untyped-def]
        runs.append((len(scans), entry.record["method"]))
        entry.planned(["image-1"])
        entry.delivered("image-1")

    counts = jr.recover(fresh, run)
    assert counts == {"delivered": 1, "failed": 1}
    assert runs == [(1, "zero-filled")]
    assert sorted(released) == sorted([done.id, partial.id])
    assert not list((tmp_path / "journal").glob("*.json")) and not list((tmp_path / "journal").glob("*.h5"))
    (kept,) = (tmp_path / "failed").glob("*.h5")
    assert "\n" not in kept.name and "/" not in kept.name and len(kept.name) < 120
    reason = json.loads(kept.with_suffix(".reason.json").read_text())
    assert reason["reason"].startswith("incomplete stream")
    assert len(ismrmrd_io.read_raw(kept)) == jr.BATCH_ROWS


def test_recover_skips_volumes_the_spool_finished_and_gives_up_after_max_attempts(
    shepp_full: Path, tmp_path: Path
) -> None:
    header, acqs = _acquisitions(shepp_full)
    journal = jr.Journal(tmp_path / "journal", failed_dir=tmp_path / "failed")
    entry = journal.begin(header)
    for acq in acqs:
        entry.append(acq)
    entry.seal(method=None, samples=None, options={})
    entry.planned(["image-1"])
    entry.leave()
    # The DICOM spool reconciled the series of volume image-1: nothing to reconstruct.
    assert jr.recover(jr.Journal(tmp_path / "journal"), None, reconciled=[f"{entry.id}/image-1"]) == {
        "delivered": 1,
        "failed": 0,
    }
    again = journal.begin(header)
    for acq in acqs:
        again.append(acq)
    again.seal(method=None, samples=None, options={})
    again.record["attempts"] = jr.MAX_ATTEMPTS
    again._save()
    again.leave()
    assert jr.recover(
        jr.Journal(tmp_path / "journal", failed_dir=tmp_path / "failed"), lambda s, e: None
    ) == {
        "delivered": 0,
        "failed": 1,
    }
    (kept,) = (tmp_path / "failed").glob("*.reason.json")
    assert "not finished in 2 starts" in json.loads(kept.read_text())["reason"]


def test_move_unique_never_overwrites(tmp_path: Path) -> None:
    folder = tmp_path / "failed"
    names = set()
    for i in range(20):
        src = tmp_path / f"s{i}.h5"
        src.write_bytes(bytes([i]))
        names.add(jr.move_unique(src, folder, "20260101T000000-M").name)
        assert not src.exists()
    assert len(names) == 20 and len(list(folder.iterdir())) == 20
    part = jr.safe_name_part("../a b\n\x1b[31m" + "é" * 100)
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", part), part
