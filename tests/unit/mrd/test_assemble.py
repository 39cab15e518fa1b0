"""Assembler on Debian-generated Shepp-Logan raw data (oversampled readout, noise, ACS)."""

from __future__ import annotations

import gc
import io
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from recon_server.mrd import ismrmrd_io, wire
from recon_server.mrd.assemble import Assembler, assemble
from recon_server.mrd.encoding import contrast_label, parse_header
from recon_server.mrd.oversampling import StreamingCropper, remove_readout_oversampling
from recon_server.scan import KSpaceScan


def _assemble(path: Path) -> list:
    raw = ismrmrd_io.read_raw(path)
    asm = Assembler(raw.header_xml)
    for head, data in zip(raw.acquisition_headers, raw.data, strict=True):
        asm.add_line(head, data)
    return asm.finish()


def _nrmse_csm_combined(kspace: np.ndarray, ph: np.ndarray, csm: np.ndarray) -> float:
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    comb = np.abs((np.conj(csm) * img).sum(0) / np.maximum((np.abs(csm) ** 2).sum(0), 1e-6))
    scale = (comb * ph).sum() / (comb * comb).sum()
    return float(np.linalg.norm(scale * comb - ph) / np.linalg.norm(ph))


def test_fully_sampled_scan_matches_truth(shepp_full: Path, shepp_truth) -> None:
    (scan,) = _assemble(shepp_full)
    assert scan.kspace.shape == (1, 4, 64, 64)  # 128 oversampled readout points -> 64
    assert scan.noise is not None and scan.noise.shape == (4, 128)
    assert scan.acceleration == 1.0 and scan.mask.all()
    assert scan.geometry[0].fov_mm == (300.0, 300.0, 6.0)
    assert scan.geometry[0].read_dir == (1.0, 0.0, 0.0)  # zero vectors in the file -> identity
    ph, csm = shepp_truth(shepp_full)
    # With the true coil maps only noise (level 0.05) remains; measured 0.165.
    assert _nrmse_csm_combined(scan.kspace[0], ph, csm) < 0.22
    # A transposed or flipped placement would be far off.
    assert _nrmse_csm_combined(scan.kspace[0, :, ::-1], ph, csm) > 0.4


def test_interleaved_calibration_scan_every_line_is_data(shepp_accel2: Path) -> None:
    scans = _assemble(shepp_accel2)
    assert [s.repetition for s in scans] == [0, 1]
    first = scans[0]
    lines = first.mask[:, 0]
    # The generator's calibration-only lines (odd rows 25..39) are measurements: data and mask.
    assert lines[::2].all() and lines[24:40].all() and not lines[1:24:2].any()
    assert first.acceleration == pytest.approx(64 / 40)
    assert first.acs == (24, 41)  # the flagged block and the imaging line next to it
    assert np.abs(first.kspace[0, :, 25, :]).sum() > 0
    assert np.shares_memory(first.calibration, first.kspace)  # a view: no merged copy needed
    assert first.calibration.shape == (1, 4, 17, 64)


def test_interleaved_calibration_scan_pure_imaging_grid(shepp_accel2: Path) -> None:
    raw = ismrmrd_io.read_raw(shepp_accel2)
    scans = assemble(
        raw.header_xml,
        list(zip(raw.acquisition_headers, raw.data, strict=True)),
        calibration_lines="calibration",
    )
    first = scans[0]
    lines = first.mask[:, 0]
    assert lines[::2].all() and not lines[1::2].any()
    assert first.acceleration == 2.0
    assert first.acs == (24, 40)
    # Calibration-only (odd) lines come from the ACS readouts, not from the imaging k-space.
    assert np.abs(first.calibration[0, :, 1, :]).sum() > 0
    assert np.abs(first.kspace[0, :, 25, :]).sum() == 0
    assert first.calibration.shape == (1, 4, 16, 64)


def test_wire_stream_and_recon_data_give_the_same_scan(shepp_full: Path) -> None:
    raw = ismrmrd_io.read_raw(shepp_full)
    buf = io.BytesIO()
    writer = wire.WireWriter(buf)
    for head, data in zip(raw.acquisition_headers, raw.data, strict=True):
        writer.send(wire.Acquisition(head, data, np.zeros((data.shape[1], 0), np.float32)), flush=False)
    writer.send(wire.Close())
    buf.seek(0)
    asm = Assembler(raw.header_xml)
    for msg in wire.WireReader(buf):
        assert isinstance(msg, wire.Acquisition)
        asm.add(msg)
    (streamed,) = asm.finish()
    (direct,) = _assemble(shepp_full)
    np.testing.assert_array_equal(streamed.kspace, direct.kspace)
    # Gadgetron-style ReconData [E0,E1,E2,CHA,N,S,LOC] of the de-oversampled k-space.
    k = direct.kspace[0]  # (coils, ky, kx)
    data = np.transpose(k, (2, 1, 0))[:, :, None, :, None, None, None]
    headers = ismrmrd_io.new_acquisition_headers(64).reshape(64, 1, 1, 1, 1)
    headers["idx"]["kspace_encode_step_1"] = np.arange(64).reshape(64, 1, 1, 1, 1)
    headers["number_of_samples"], headers["center_sample"], headers["active_channels"] = 64, 32, 4
    recon = wire.ReconData([wire.ReconBit(wire.ReconBuffer(data=data, headers=headers))])
    asm2 = Assembler(raw.header_xml)
    asm2.add_recon_data(recon)
    (from_recon,) = asm2.finish()
    np.testing.assert_allclose(from_recon.kspace, direct.kspace, atol=1e-6)


def test_errors_are_clear(shepp_full: Path) -> None:
    raw = ismrmrd_io.read_raw(shepp_full)
    with pytest.raises(ValueError, match="does not parse"):
        Assembler("<ismrmrdHeader><broken")
    asm = Assembler(raw.header_xml)
    with pytest.raises(ValueError, match="has 3 channels but the header / earlier readouts say 4"):
        asm.add_line(raw.acquisition_headers[1], raw.data[1][:3])
    asm = Assembler(raw.header_xml)
    asm.add_line(raw.acquisition_headers[0], raw.data[0])  # the noise readout only
    with pytest.raises(ValueError, match="no imaging readouts"):
        asm.finish()
    head = raw.acquisition_headers[1].copy()
    head["idx"]["kspace_encode_step_1"] = 500
    with pytest.raises(ValueError, match="outside the encoded matrix"):
        Assembler(raw.header_xml).add_line(head, raw.data[1])


def test_contrast_rule() -> None:
    base = parse_header(
        "<ismrmrdHeader xmlns='http://www.ismrm.org/ISMRMRD'><experimentalConditions>"
        "<H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>"
        "<encoding><encodedSpace><matrixSize><x>8</x><y>8</y><z>1</z></matrixSize><fieldOfView_mm><x>1</x>"
        "<y>1</y><z>1</z></fieldOfView_mm></encodedSpace><reconSpace><matrixSize><x>8</x><y>8</y><z>1</z>"
        "</matrixSize><fieldOfView_mm><x>1</x><y>1</y><z>1</z></fieldOfView_mm></reconSpace>"
        "<encodingLimits/><trajectory>cartesian</trajectory></encoding>"
        "<sequenceParameters><TR>9000</TR><TE>90</TE><TI>2500</TI></sequenceParameters></ismrmrdHeader>"
    )
    assert contrast_label(base) == "FLAIR"  # TI >= 1500 and TE >= 60
    assert contrast_label(base, {"contrast": "t2"}) == "T2"
    base.sequenceParameters.TI = []
    assert contrast_label(base) == "T2"
    base.measurementInformation = ismrmrd.xsd.measurementInformationType(
        protocolName="ax t1 post gd", patientPosition=ismrmrd.xsd.patientPositionType.HFS
    )
    assert contrast_label(base) == "T1POST"


def test_readout_oversampling_removal_keeps_the_central_fov() -> None:
    x = np.zeros(128, dtype=np.complex64)
    x[40:88] = 1.0  # an object in the central half of the oversampled FOV
    k = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x), norm="ortho")).astype(np.complex64)
    k64 = remove_readout_oversampling(k[None], 64)[0]
    back = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(k64), norm="ortho"))
    np.testing.assert_allclose(np.abs(back), np.abs(x[32:96]), atol=1e-5)


@pytest.mark.parametrize(("full", "nx"), [(128, 64), (132, 66), (96, 70), (129, 64), (128, 65)])
def test_readout_oversampling_removal_equals_the_shifted_definition(full: int, nx: int) -> None:
    # The shift-free even path must equal fftc(crop(ifftc(k))) written out with every shift.
    rng = np.random.default_rng(full + nx)
    k = (rng.standard_normal((2, 3, full)) + 1j * rng.standard_normal((2, 3, full))).astype(np.complex64)
    img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(k, axes=-1), norm="ortho"), axes=-1)
    start = (full - nx) // 2
    crop = img[..., start : start + nx]
    want = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(crop, axes=-1), norm="ortho"), axes=-1)
    got = remove_readout_oversampling(k, nx)
    assert got.dtype == np.complex64 and got.shape == (2, 3, nx)
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("nx", [16, 12])  # the 2x path (even/odd staging) and the general one
def test_streaming_cropper_matches_the_bulk_crop_across_batches(nx: int) -> None:
    # 10 lines through batches of 3 (three placed while streaming, one flushed), two of them
    # partial readouts (asymmetric echo) placed off-centre in their rows, at an even and an odd
    # column (the 2x path stages even and odd samples apart).
    rng = np.random.default_rng(3)
    full, coils = 32, 2
    rows = (rng.standard_normal((10, coils, full)) + 1j * rng.standard_normal((10, coils, full))).astype(
        np.complex64
    )
    rows[4, :, :8] = 0
    rows[7, :, :5] = 0
    got: dict[int, np.ndarray] = {}

    def place(cropped: tuple[list[int], np.ndarray] | None) -> None:
        if cropped is not None:
            targets, lines = cropped
            got.update(zip(targets, lines.copy(), strict=True))  # lines are reused next batch

    cropper: StreamingCropper[int] = StreamingCropper(coils, full, nx, batch=3)
    for i, row in enumerate(rows):
        x0 = {4: 8, 7: 5}.get(i, 0)
        place(cropper.add(i, row[:, x0:], x0))
    assert sorted(got) == list(range(9))  # three full batches cropped while streaming
    place(cropper.flush())
    assert sorted(got) == list(range(10))
    assert cropper.flush() is None
    want = remove_readout_oversampling(rows, nx)
    np.testing.assert_allclose(np.stack([got[i] for i in range(10)]), want, atol=1e-5)


def _oversampled_stream(
    slices: int, header_slices: int, *, coils: int = 2, ny: int = 16, full: int = 32, nx: int = 16
) -> tuple[str, np.ndarray, np.ndarray]:
    """(header, acquisition heads, k-space (slices, coils, ny, full)) of a 2x oversampled scan."""
    header = f"""<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
<experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>
<encoding><encodedSpace><matrixSize><x>{full}</x><y>{ny}</y><z>1</z></matrixSize>
<fieldOfView_mm><x>480</x><y>240</y><z>5</z></fieldOfView_mm></encodedSpace>
<reconSpace><matrixSize><x>{nx}</x><y>{ny}</y><z>1</z></matrixSize>
<fieldOfView_mm><x>240</x><y>240</y><z>5</z></fieldOfView_mm></reconSpace>
<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{ny - 1}</maximum>
<center>{ny // 2}</center>
</kspace_encoding_step_1><slice><minimum>0</minimum><maximum>{header_slices - 1}</maximum>
<center>0</center></slice>
</encodingLimits><trajectory>cartesian</trajectory></encoding></ismrmrdHeader>"""
    rng = np.random.default_rng(5)
    k = (rng.standard_normal((slices, coils, ny, full)) + 0j).astype(np.complex64)
    heads = ismrmrd_io.new_acquisition_headers(ny * slices)
    heads["idx"]["kspace_encode_step_1"] = np.tile(np.arange(ny), slices)
    heads["idx"]["slice"] = np.repeat(np.arange(slices), ny)
    heads["center_sample"] = full // 2
    return header, heads, k


def _assemble_lines(header: str, heads: np.ndarray, k: np.ndarray) -> KSpaceScan:
    asm = Assembler(header)
    for head in heads:
        asm.add_line(head, k[head["idx"]["slice"], :, head["idx"]["kspace_encode_step_1"]])
    (scan,) = asm.finish()
    return scan


def test_assembler_crops_oversampled_lines_in_batches_across_slices() -> None:
    # More lines than five cropping batches, the last slice beyond the header's limits (the
    # buffer grows after batches were placed): equal to the bulk crop.
    header, heads, k = _oversampled_stream(slices=20, header_slices=19)
    scan = _assemble_lines(header, heads, k)
    np.testing.assert_allclose(scan.kspace, remove_readout_oversampling(k, 16), atol=1e-5)


def test_the_next_scan_reuses_the_k_space_memory_of_a_dropped_one() -> None:
    # The assembler must not keep itself alive (no reference cycle through the cropper), so a
    # dropped scan's pooled store is free for the next scan at once, without the cyclic GC.
    header, heads, k = _oversampled_stream(slices=3, header_slices=3)
    gc.disable()
    try:
        first = _assemble_lines(header, heads, k)
        where = first.kspace.__array_interface__["data"][0]
        del first
        second = _assemble_lines(header, heads, 2 * k)
    finally:
        gc.enable()
    assert second.kspace.__array_interface__["data"][0] == where
    np.testing.assert_allclose(second.kspace, remove_readout_oversampling(2 * k, 16), atol=1e-5)
