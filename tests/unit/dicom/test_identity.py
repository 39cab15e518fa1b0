"""DICOM identity of real scans: UIDs per scan (also without study UID / measurement ID),
replays keep them, one series number per method, and fallback marking.

Raw data from Debian's ``ismrmrd_generate_cartesian_shepp_logan`` (package ismrmrd-tools):
its header has no StudyInstanceUID, no measurement ID and no series number.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from recon_server.dicom.identity import METHOD_SLOTS, series_number
from recon_server.dicom.writer import (
    FALLBACK_IMAGE_TYPE,
    build_series,
    dicom_series_description,
    fallback_note,
    write_series,
)
from recon_server.mrd import ismrmrd_io
from recon_server.mrd.assemble import Assembler
from recon_server.recon import pipeline
from recon_server.scan import ImageVolume

TOOL = "ismrmrd_generate_cartesian_shepp_logan"
#: research data: the generator's header has no PatientID, study date/time or study ID
#: (dciodvfy's DICOMDIR hints about them; docs/dicom.md, accepted warnings)
RESEARCH_HEADER = ("needed to build DICOMDIR - Patient ID", "needed to build DICOMDIR - Study ")
INT32_MAX = 2**31 - 1


def _generate(path: Path, *args: str) -> Path:
    if shutil.which(TOOL) is None:
        pytest.fail(f"{TOOL} not found: install the Debian package ismrmrd-tools (make deps)")
    subprocess.run([TOOL, *args, "-o", str(path)], check=True, capture_output=True, timeout=60)
    return path


@pytest.fixture(scope="module")
def raw_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """a: 64x64 4 coils R=2 (noise 0.05); a_again: the same command again (the generator is
    seeded: the same scan); noisier: noise 0.1; small: matrix 48."""
    d = tmp_path_factory.mktemp("identity")
    base = ("-c", "4", "-a", "2", "-w", "16")
    return {
        "a": _generate(d / "a.h5", "-m", "64", *base),
        "a_again": _generate(d / "a_again.h5", "-m", "64", *base),
        "noisier": _generate(d / "noisier.h5", "-m", "64", *base, "-n", "0.1"),
        "small": _generate(d / "small.h5", "-m", "48", *base),
    }


def _volumes(path: Path, method: str = "zero-filled") -> list[ImageVolume]:
    raw = ismrmrd_io.read_raw(path)
    asm = Assembler(raw.header_xml)
    for head, data in zip(raw.acquisition_headers, raw.data, strict=True):
        asm.add_line(head, data)
    return [pipeline.reconstruct(scan, method=method) for scan in asm.finish()]


def _write(volumes: list[ImageVolume], out: Path) -> list[Path]:
    return [p for v in volumes for p in write_series(v, out)]


def _uids(files: list[Path]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {"study": set(), "series": set(), "sop": set()}
    for path in files:
        ds = pydicom.dcmread(path)
        found["study"].add(str(ds.StudyInstanceUID))
        found["series"].add(str(ds.SeriesInstanceUID))
        found["sop"].add(str(ds.SOPInstanceUID))
    return found


def test_different_scans_never_share_uids_and_all_files_survive(tmp_path, raw_files, validate):
    out = tmp_path / "dicom"
    volumes = {name: _volumes(raw_files[name]) for name in ("a", "noisier", "small")}
    digests = [v.raw_digest for vs in volumes.values() for v in vs]
    assert all(digests) and len(set(digests)) == len(volumes)  # one digest per scan (file)
    written = {name: _write(vs, out) for name, vs in volumes.items()}
    uids = {name: _uids(files) for name, files in written.items()}
    for kind in ("study", "series", "sop"):
        for x, y in (("a", "noisier"), ("a", "small"), ("noisier", "small")):
            assert not uids[x][kind] & uids[y][kind], f"{x} and {y} share a {kind} UID"
    # every file of every scan is still there: nothing overwrote anything
    on_disk = sorted(out.rglob("*.dcm"))
    assert sorted(p for files in written.values() for p in files) == on_disk
    assert len(on_disk) == sum(len(files) for files in written.values())
    sops = {str(pydicom.dcmread(p).SOPInstanceUID) for p in on_disk}
    assert len(sops) == len(on_disk)
    for files in written.values():
        validate(files, accept=RESEARCH_HEADER)


def test_the_same_scan_replayed_keeps_its_uids(tmp_path, raw_files):
    out = tmp_path / "dicom"
    first = _write(_volumes(raw_files["a"]), out)
    again = _write(_volumes(raw_files["a"]), out)  # the same file twice
    regenerated = _write(_volumes(raw_files["a_again"]), out)  # the same raw data, another file
    assert first == again == regenerated
    assert _uids(first) == _uids(again) == _uids(regenerated)
    assert len(list(out.rglob("*.dcm"))) == len(first)


def test_two_methods_on_one_scan_are_two_series(tmp_path, raw_files, validate):
    zero = _volumes(raw_files["a"], "zero-filled")[0]
    cg = _volumes(raw_files["a"], "cg-sense")[0]
    a, b = build_series(zero)[0], build_series(cg)[0]
    assert a.StudyInstanceUID == b.StudyInstanceUID
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    assert int(a.SeriesNumber) != int(b.SeriesNumber)
    out = tmp_path / "dicom"
    files = write_series(zero, out) + write_series(cg, out)
    assert len(list(out.rglob("*.dcm"))) == len(files) == 2
    validate(files, accept=RESEARCH_HEADER)


def test_series_numbers_per_method_above_the_scanner_numbers(vol):
    """Header series 7: every method and series index gets its own number, none the
    scanner's, all valid IS values."""
    numbers = {}
    for method in [*METHOD_SLOTS, "my-research-method"]:
        for index in (0, 1, 2, 1001, 501):
            volume = vol.make_volume(series_index=index, model=False)
            volume.provenance.method = method
            numbers[method, index] = int(build_series(volume)[0].SeriesNumber)
    assert len(set(numbers.values())) == len(numbers)
    assert all(700_000 <= n < 800_000 for n in numbers.values())  # scanner series 7 as prefix
    assert numbers["zero-filled", 1] == 710_001 and numbers["dps", 1] == 740_001
    assert numbers["dps", 501] == numbers["dps", 1] + pipeline.SD_SERIES_OFFSET
    # no scanner series number: still above the scanner's usual range
    assert series_number(0, "zero-filled", 1) == 10_001
    # the largest prefix and a too-large scanner number stay within IS (int32)
    assert series_number(21473, "dps-warm", 9999) <= INT32_MAX
    assert 100_000 <= series_number(10**9, "dps", 12345) <= INT32_MAX
    assert series_number(7, "dps", 12345) == series_number(7, "dps", 2345)


def test_fallback_is_marked_and_valid(tmp_path, vol, validate):
    volume = vol.make_volume(model=False)
    volume = dataclasses.replace(
        volume,
        provenance=dataclasses.replace(
            volume.provenance,
            method="zero-filled",
            settings={"fallback_from": "dps", "fallback_reason": "CUDA out of memory"},
        ),
        series_description="FLAIR tra (fallback)",
    )
    note = "FALLBACK: dps failed (CUDA out of memory); reconstructed with zero-filled"
    assert fallback_note(volume) == note
    files = write_series(volume, tmp_path)
    validate(files)  # dciodvfy accepts ImageType ORIGINAL\PRIMARY\OTHER\M\ZERO_FILLED\FALLBACK
    ds = pydicom.dcmread(files[0])
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "OTHER", "M", "ZERO_FILLED", FALLBACK_IMAGE_TYPE]
    assert ds.ImageComments.startswith(note)
    assert ds.SeriesDescription == "FLAIR tra (fallback) [recon: zero-filled]"
    plain = build_series(vol.make_volume(model=False))[0]
    assert "FALLBACK" not in plain.ImageComments and FALLBACK_IMAGE_TYPE not in plain.ImageType
    # a long protocol name is shortened, the fallback suffix kept (LO 64)
    long = dataclasses.replace(
        volume, series_description="t2_tirm_tra_dark-fluid_4mm_p2 (fallback: zero-filled)"
    )
    text = dicom_series_description(long)
    assert len(text) <= 64 and text.endswith(" (fallback: zero-filled) [recon: zero-filled]")
    assert text.startswith("t2_tirm")
    # a deliberate zero-filled recon of the same scan is another series than the fallback
    deliberate = dataclasses.replace(
        volume, provenance=dataclasses.replace(volume.provenance, settings={}), series_description="FLAIR tra"
    )
    assert build_series(deliberate)[0].SeriesInstanceUID != ds.SeriesInstanceUID
    assert build_series(volume)[0].SeriesInstanceUID == ds.SeriesInstanceUID
