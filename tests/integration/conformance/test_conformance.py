"""Raw data as scanners send it (corpus.py), through the assembler, `serve` + `replay` and `recon`.

Every convention of the corpus is reconstructed by every method, once through the stream server
(as a scanner or `recon-server replay` sends it) and once through `recon-server recon`, and the
magnitude is compared with the simulator's noiseless truth (scale-fitted NRMSE inside the head).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import ismrmrd
import numpy as np
import pytest

from recon_server.cli import main as cli
from recon_server.data.acquire import SimulatedSubject
from recon_server.mrd import ismrmrd_io
from recon_server.mrd.assemble import Assembler
from recon_server.mrd.oversampling import remove_readout_oversampling
from recon_server.mrd.replay import ReplayResult, stream_scan
from recon_server.recon import pipeline
from recon_server.research.quality import nrmse
from recon_server.scan import KSpaceScan
from recon_server.service.config import ServiceConfig
from recon_server.service.server import StreamServer

METHODS = ("zero-filled", "cg-sense", "l1-wavelet", "dps", "dps-fast", "dps-warm")
# Measured on this corpus (96x96, 8 coils, simulator noise; docs/service.md) with margin. The
# noise alone, fully sampled, costs ~0.08; a flipped or misplaced image is ~1. `dps` runs 24
# steps here (its quality needs hundreds; the point is that it runs on every layout).
NRMSE_BOUND = {
    "zero-filled": 0.28,
    "cg-sense": 0.16,
    "l1-wavelet": 0.15,
    "dps": 0.40,
    "dps-fast": 0.17,
    "dps-warm": 0.15,
}
NEEDS_COIL_MAPS = ("cg-sense", "l1-wavelet", "dps", "dps-fast", "dps-warm")


def _scan(path: Path, **kwargs: object) -> KSpaceScan:
    raw = ismrmrd_io.read_raw(path)
    asm = Assembler(raw.header_xml, **kwargs)  # type: ignore[arg-type]
    for head, data in zip(raw.acquisition_headers, raw.data, strict=True):
        asm.add_line(head, data)
    (scan,) = asm.finish()
    return scan


def _error(images: np.ndarray, truth: tuple[np.ndarray, np.ndarray]) -> float:
    magnitude, head = truth
    return nrmse(images, magnitude, mask=head, fit_scale=True)


# ------------------------------------------------------------------ assembly of each convention


def test_scanner_flags_give_the_same_scan_as_all_imaging_flags(corpus_files: dict[str, Path]) -> None:
    reference = _scan(corpus_files["embedded-all-imaging"])
    for case in ("embedded-scanner-flags", "embedded-acs-last", "interleaved-slices", "noise-dwell-time"):
        scan = _scan(corpus_files[case])
        assert np.array_equal(scan.kspace, reference.kspace), case
        assert np.array_equal(scan.mask, reference.mask), case
        assert scan.acs == reference.acs and scan.acceleration == reference.acceleration, case


def test_pure_imaging_grid_keeps_calibration_lines_out_of_the_data(corpus_files: dict[str, Path]) -> None:
    every = _scan(corpus_files["embedded-scanner-flags"])
    grid = _scan(corpus_files["embedded-scanner-flags"], calibration_lines="calibration")
    rows_every, rows_grid = every.mask[:, 0], grid.mask[:, 0]
    assert rows_grid.sum() == 24 and rows_every.sum() == 36  # R=4 of 96, plus 12 off-grid ACS lines
    assert grid.acceleration == 4.0 and grid.acs == (40, 56)
    assert np.array_equal(grid.calibration, every.kspace[:, :, 40:56])


def test_separate_reference_is_calibration_only(
    corpus_files: dict[str, Path], subject: SimulatedSubject
) -> None:
    same = _scan(corpus_files["separate-same-encoding"])
    own = _scan(corpus_files["separate-own-encoding"])
    for scan in (same, own):
        assert scan.mask[:, 0].sum() == 48 and scan.acceleration == 2.0  # the imaging grid only
        assert scan.acs == (36, 60)
    full = remove_readout_oversampling(subject.kspace, subject.truth.shape[-1])
    np.testing.assert_allclose(same.calibration, full[:, :, 36:60], atol=1e-6)
    # Its own encoding: half the readout at the same field of view -> the central 48 columns.
    centre = slice(48 - 12, 48 + 12)
    ref = own.calibration[..., centre]
    np.testing.assert_allclose(ref, full[:, :, 36:60, centre], atol=0.05 * np.abs(ref).max())
    assert np.abs(own.calibration[..., :20]).max() == 0


def test_partial_fourier_asymmetric_echo_averages_slice_order_noise_dwell(
    corpus_files: dict[str, Path], subject: SimulatedSubject, layouts: ModuleType
) -> None:
    pf = _scan(corpus_files["partial-fourier-phase"])
    assert not pf.mask[: 96 * 3 // 8].any() and pf.mask[96 * 3 // 8 :: 2].all()
    assert np.abs(pf.kspace[:, :, : 96 * 3 // 8]).max() == 0

    echo = _scan(corpus_files["asymmetric-echo"])
    columns = echo.mask[echo.acs[0]]
    skip = 192 // 5  # of the oversampled readout: 19 of the 96 recon columns not measured
    assert not columns[: skip // 2].any() and columns[skip // 2 + 1 :].all()

    single = _scan(corpus_files["embedded-scanner-flags"])
    averaged = _scan(corpus_files["averages"])
    raw = ismrmrd_io.read_raw(corpus_files["averages"])
    second = [d for h, d in zip(raw.acquisition_headers, raw.data, strict=True) if h["idx"]["average"] == 1]
    assert len(second) == int(single.mask[:, 0].sum()) * 2
    first_row = int(np.flatnonzero(single.mask[:, 0])[0])
    again = remove_readout_oversampling(second[0][None], 96)[0]
    np.testing.assert_allclose(
        averaged.kspace[0, :, first_row], (single.kspace[0, :, first_row] + again) / 2, atol=1e-5
    )

    interleaved = _scan(corpus_files["interleaved-slices"])
    np.testing.assert_allclose(  # float32 in the readout headers
        [g.position for g in interleaved.geometry], [g.position for g in subject.geometry], atol=1e-4
    )

    # Noise scanned at twice the dwell time has half the variance: scaled back to the imaging one.
    dwell = _scan(corpus_files["noise-dwell-time"])
    assert dwell.noise is not None and single.noise is not None
    np.testing.assert_allclose(dwell.noise, single.noise, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ every method, both ways in


def _through_server(server: StreamServer, path: Path, method: str) -> tuple[np.ndarray, list[str]]:
    result = _replay(server, path, method)
    return result.magnitude(), result.errors


def _replay(server: StreamServer, path: Path, method: str) -> ReplayResult:
    assert server.address is not None
    return stream_scan(
        ismrmrd_io.read_raw(path),
        host=server.address[0],
        port=server.address[1],
        options={"method": method},
        progress=False,
        timeout_s=120,
    )


def test_every_method_through_serve_and_replay(
    case: str,
    corpus_files: dict[str, Path],
    server: StreamServer,
    truth: tuple[np.ndarray, np.ndarray],
) -> None:
    for method in METHODS:
        images, errors = _through_server(server, corpus_files[case], method)
        assert not errors, (case, method, errors)
        assert images.shape == truth[0].shape, (case, method)
        assert _error(images, truth) < NRMSE_BOUND[method], (case, method, _error(images, truth))


def test_every_method_through_recon(
    case: str,
    corpus_files: dict[str, Path],
    truth: tuple[np.ndarray, np.ndarray],
    recon_options: list[str],
    tmp_path: Path,
) -> None:
    for method in METHODS:
        out = tmp_path / method
        argv = ["recon", str(corpus_files[case]), "--out", str(out), "--method", method, *recon_options]
        code = cli.main(argv)
        assert code == 0, (case, method)
        images = np.load(out / "images.npy")
        assert _error(images, truth) < NRMSE_BOUND[method], (case, method, _error(images, truth))


def test_scanner_flags_every_method_within_two_percent_of_all_imaging(
    corpus_files: dict[str, Path], server: StreamServer, truth: tuple[np.ndarray, np.ndarray]
) -> None:
    for method in METHODS:
        scanner, errors = _through_server(server, corpus_files["embedded-scanner-flags"], method)
        assert not errors, (method, errors)
        imaging, _ = _through_server(server, corpus_files["embedded-all-imaging"], method)
        a, b = _error(scanner, truth), _error(imaging, truth)
        assert abs(a - b) <= 0.02 * b, (method, a, b)


def test_every_measured_line_improves_on_the_imaging_grid(
    corpus_files: dict[str, Path], truth: tuple[np.ndarray, np.ndarray]
) -> None:
    """The calibration-only lines are measurements: leaving them out (the option) costs accuracy.

    Linear and convex methods (the data's use, not a prior's): the shipped diffusion prior learnt
    0.94 mm pixels, this corpus has 2.5 mm, where its NRMSE says little about the data.
    """
    every = _scan(corpus_files["embedded-scanner-flags"])
    grid = _scan(corpus_files["embedded-scanner-flags"], calibration_lines="calibration")
    for method in ("zero-filled", "cg-sense", "l1-wavelet"):
        with_all = _error(pipeline.reconstruct(every, method=method).magnitude, truth)
        imaging_only = _error(pipeline.reconstruct(grid, method=method).magnitude, truth)
        assert with_all < imaging_only, (method, with_all, imaging_only)


def test_no_calibration_at_all(
    corpus_files: dict[str, Path],
    server: StreamServer,
    truth: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No ACS lines and no fully sampled centre: root sum of squares, marked, instead of nothing."""
    path = corpus_files["no-calibration"]
    for method in METHODS:
        result = _replay(server, path, method)
        assert not result.errors, (method, result.errors)
        images = result.magnitude()
        assert images.shape == truth[0].shape
        # R=2 without coil maps: the aliased root sum of squares, far from the truth but the anatomy.
        assert _error(images, truth) < 0.6, (method, _error(images, truth))
        meta = ismrmrd.Meta.deserialize(result.images[0].meta_xml)
        if method == "zero-filled":
            assert "Fallback" not in meta
        else:
            assert meta["Fallback"].startswith(f"{method} -> zero-filled: no-calibration:"), meta["Fallback"]
    assert cli.main(["recon", str(path), "--out", str(tmp_path / "zf"), "--method", "zero-filled"]) == 0
    capsys.readouterr()
    assert cli.main(["recon", str(path), "--out", str(tmp_path / "cg"), "--method", "cg-sense"]) != 0
    error = capsys.readouterr().err  # the one error line of the command
    assert "recon-server recon: error: no calibration data (no ACS lines and no fully sampled" in error


def test_pure_imaging_grid_is_a_service_setting(
    corpus_files: dict[str, Path], truth: tuple[np.ndarray, np.ndarray]
) -> None:
    path = corpus_files["embedded-scanner-flags"]
    grid = _scan(path, calibration_lines="calibration")
    expected = _error(pipeline.reconstruct(grid, method="cg-sense").magnitude, truth)
    server = StreamServer(ServiceConfig(port=0, calibration_lines="calibration", socket_timeout_s=60))
    server.start()
    try:
        images, errors = _through_server(server, path, "cg-sense")
    finally:
        server.stop()
    assert not errors
    assert _error(images, truth) == pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="calibration_lines must be one of auto, data, calibration"):
        ServiceConfig(calibration_lines="imaging")
