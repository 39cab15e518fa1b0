"""The subject files: ISMRMRD raw/reference structure, header, flags, determinism, and the assembler."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import ismrmrd
import numpy as np
from ismrmrd import xsd

from recon_server.data import acquire, coils, ismrmrd_raw
from recon_server.mrd.assemble import Assembler
from recon_server.mrd.ismrmrd_io import read_raw


def _bit(flag: int) -> int:
    return 1 << (flag - 1)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_raw_file_holds_noise_then_acquired_lines_with_calibration_flags(sim_dir: Path) -> None:
    raw = read_raw(sim_dir / "sub-000" / "raw.h5")
    meta = json.loads((sim_dir / "sub-000" / "subject.json").read_text())
    flags = raw.acquisition_headers["flags"].astype(np.int64)
    noise = (flags & _bit(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)) != 0
    assert noise[: ismrmrd_raw.NOISE_ACQUISITIONS].all() and not noise[ismrmrd_raw.NOISE_ACQUISITIONS :].any()
    imaging = ~noise
    ky = raw.acquisition_headers["idx"]["kspace_encode_step_1"][imaging]
    slices = raw.acquisition_headers["idx"]["slice"][imaging]
    assert len(ky) == meta["acquired_lines"] * meta["slices"]
    assert len(set(ky.tolist())) == meta["acquired_lines"] < meta["matrix"]
    start, stop = meta["acs"]
    calib = (flags & _bit(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)) != 0
    both = (flags & _bit(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)) != 0
    in_acs = (ky >= start) & (ky < stop)
    assert np.array_equal(both[imaging], in_acs) and not calib.any()  # fastMRI style: ACS lines are data
    first = (flags & _bit(ismrmrd.ACQ_FIRST_IN_SLICE)) != 0
    last = (flags & _bit(ismrmrd.ACQ_LAST_IN_SLICE)) != 0
    assert sorted(slices[first[imaging]].tolist()) == list(range(meta["slices"]))
    assert sorted(slices[last[imaging]].tolist()) == list(range(meta["slices"]))
    assert flags[-1] & _bit(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    h = raw.acquisition_headers[imaging][0]
    assert h["number_of_samples"] == 2 * meta["matrix"] and h["center_sample"] == meta["matrix"]
    assert h["active_channels"] == h["available_channels"] == meta["coils"]
    assert h["sample_time_us"] > 0 and h["discard_pre"] == 0 and h["discard_post"] == 0


def test_raw_lines_are_the_reference_samples(sim_dir: Path) -> None:
    raw = read_raw(sim_dir / "sub-000" / "raw.h5")
    ref = read_raw(sim_dir / "sub-000" / "reference.h5")
    lookup = {
        (int(h["idx"]["slice"]), int(h["idx"]["kspace_encode_step_1"])): d
        for h, d in zip(
            ref.acquisition_headers[ismrmrd_raw.NOISE_ACQUISITIONS :],
            ref.data[ismrmrd_raw.NOISE_ACQUISITIONS :],
            strict=True,
        )
    }
    assert len(lookup) == len(ref.data) - ismrmrd_raw.NOISE_ACQUISITIONS
    for h, d in zip(
        raw.acquisition_headers[ismrmrd_raw.NOISE_ACQUISITIONS :],
        raw.data[ismrmrd_raw.NOISE_ACQUISITIONS :],
        strict=True,
    ):
        np.testing.assert_array_equal(
            d, lookup[(int(h["idx"]["slice"]), int(h["idx"]["kspace_encode_step_1"]))]
        )
    truth = np.load(sim_dir / "sub-000" / "truth.npy")
    assert truth.dtype == np.complex64 and truth.shape == (3, 64, 64)


def test_header_is_complete_and_parses(sim_dir: Path) -> None:
    raw = read_raw(sim_dir / "sub-000" / "raw.h5")
    ref = read_raw(sim_dir / "sub-000" / "reference.h5")
    hdr = xsd.CreateFromDocument(raw.header_xml)
    enc = hdr.encoding[0]
    assert (enc.encodedSpace.matrixSize.x, enc.reconSpace.matrixSize.x, enc.reconSpace.matrixSize.y) == (
        128,
        64,
        64,
    )
    assert enc.encodedSpace.fieldOfView_mm.x == 2 * enc.reconSpace.fieldOfView_mm.x
    assert enc.encodingLimits.kspace_encoding_step_1.center == 32 and enc.encodingLimits.slice.maximum == 2
    assert enc.parallelImaging.accelerationFactor.kspace_encoding_step_1 == 4
    assert enc.trajectory.value == "cartesian"
    seq = hdr.sequenceParameters
    assert seq.TI and seq.TI[0] < seq.TR[0] and seq.TE[0] >= 80
    assert hdr.subjectInformation.patientID and hdr.subjectInformation.patientGender in ("F", "M")
    assert hdr.studyInformation.studyInstanceUID.startswith("2.25.")
    assert hdr.measurementInformation.protocolName == "AX_FLAIR"
    assert hdr.measurementInformation.patientPosition.value == "HFS"
    assert hdr.acquisitionSystemInformation.systemFieldStrength_T == 3.0
    assert hdr.acquisitionSystemInformation.receiverChannels == 4
    ref_hdr = xsd.CreateFromDocument(ref.header_xml)
    assert ref_hdr.encoding[0].parallelImaging.accelerationFactor.kspace_encoding_step_1 == 1
    assert ref_hdr.subjectInformation == hdr.subjectInformation


def test_service_assembler_reads_raw_file(sim_dir: Path) -> None:
    raw = read_raw(sim_dir / "sub-001" / "raw.h5")
    asm = Assembler(raw.header_xml)
    for head, data in zip(raw.acquisition_headers, raw.data, strict=True):
        asm.add_line(head, data)
    (scan,) = asm.finish()
    meta = json.loads((sim_dir / "sub-001" / "subject.json").read_text())
    assert scan.kspace.shape == (3, 4, 64, 64) and scan.contrast == "FLAIR"
    assert tuple(scan.acs) == tuple(meta["acs"])
    assert scan.noise is not None and scan.noise.shape == (4, ismrmrd_raw.NOISE_ACQUISITIONS * 128)
    assert 2.0 < scan.acceleration < 4.5
    spacing = np.linalg.norm(np.subtract(scan.geometry[1].position, scan.geometry[0].position))
    assert spacing >= 5.0 and scan.geometry[0].read_dir == (1.0, 0.0, 0.0)


def test_calibration_only_acs_lines_for_grappa_style_files(small_config: acquire.SimulationConfig) -> None:
    import dataclasses

    cfg = dataclasses.replace(small_config, acs_calibration_only=True)
    subject = acquire.simulate_subject(cfg, seed=11, index=0)
    heads, _ = ismrmrd_raw.acquisitions(subject, undersampled=True)
    flags = heads["flags"].astype(np.int64)[ismrmrd_raw.NOISE_ACQUISITIONS :]
    ky = heads["idx"]["kspace_encode_step_1"][ismrmrd_raw.NOISE_ACQUISITIONS :]
    calib = (flags & _bit(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)) != 0
    both = (flags & _bit(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)) != 0
    in_acs = (ky >= subject.acs[0]) & (ky < subject.acs[1])
    assert np.array_equal(calib | both, in_acs) and calib.any()
    assert np.array_equal(both, in_acs & subject.imaging_lines[ky])


def test_files_are_byte_identical_for_a_seed(tmp_path: Path, small_config: acquire.SimulationConfig) -> None:
    digests = []
    for run in range(2):
        subject = acquire.simulate_subject(small_config, seed=21, index=4)
        paths = acquire.write_subject(subject, tmp_path / f"run{run}")
        digests.append({name: _digest(p) for name, p in paths.items()})
    assert digests[0] == digests[1]
    assert set(digests[0]) == {"raw", "reference", "truth", "coil_weight", "subject"}


def test_oblique_tilt_rotates_phase_and_slice_directions(small_config: acquire.SimulationConfig) -> None:
    import dataclasses

    tilted = acquire.simulate_subject(dataclasses.replace(small_config, tilt_deg=15.0), seed=1, index=0)
    g = tilted.geometry[0]
    assert np.isclose(np.dot(g.phase_dir, g.slice_dir), 0.0, atol=1e-9)
    assert np.isclose(np.degrees(np.arccos(g.slice_dir[2])), 15.0)


def test_coil_weight_is_what_prewhitened_coil_combination_returns(
    small_config: acquire.SimulationConfig,
) -> None:
    # After prewhitening, unit-norm maps estimated from the data combine to m ||L^-1 S||: the
    # evaluation's reference. Check it against the whitened noiseless coil images directly.
    subject = acquire.simulate_subject(small_config, seed=21, index=4)
    weight = subject.coil_weight
    assert weight is not None and weight.shape == subject.truth.shape
    rng = np.random.default_rng([21, 4, 7])  # the noise stream of acquire._streams
    rng.uniform(30.0, 40.0) if small_config.snr is None else None
    mix = coils.noise_mixing(small_config.coils, rng)
    coil_images = np.linalg.inv(mix) @ (subject.maps * subject.truth[:, None]).reshape(
        subject.maps.shape[0], small_config.coils, -1
    )
    combined = np.sqrt((np.abs(coil_images) ** 2).sum(axis=1)).reshape(subject.truth.shape)
    seen = np.abs(subject.truth) > 0.05 * np.abs(subject.truth).max()
    ratio = combined[seen] / (np.abs(subject.truth)[seen] * weight[seen])
    np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-4)
    assert 0.05 < float(weight[seen].std()) < 0.3  # a real, smooth weighting of the order of the coil gains
