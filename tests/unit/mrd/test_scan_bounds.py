"""Bounds before allocation: hostile indices and headers are refused before any k-space exists."""

from __future__ import annotations

import gc
import time
import weakref

import numpy as np
import pytest

from recon_server.mrd import wire
from recon_server.mrd.assemble import Assembler
from recon_server.mrd.encoding import INDEX_TOLERANCE
from recon_server.service import fuzz


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _with(acq: wire.Acquisition, **idx: int) -> wire.Acquisition:
    head = np.array(acq.head, dtype=acq.head.dtype)
    for name, value in idx.items():
        head["idx"][name] = value
    return wire.Acquisition(head[()], acq.data, acq.traj)  # type: ignore[arg-type]


def test_slice_65535_with_a_one_slice_header_is_refused_without_growing() -> None:
    scan = fuzz.valid_scan()
    asm = Assembler(scan.header_xml)
    before = rss_bytes()
    asm.add(scan.readouts[0])
    with pytest.raises(ValueError, match=r"slice index 65535 beyond the header's 1 slice"):
        asm.add(_with(scan.readouts[1], slice=65535))
    assert rss_bytes() - before < 32 << 20
    assert all(s.kspace.shape[0] == 1 + INDEX_TOLERANCE for s in asm.stores.values())


@pytest.mark.parametrize(("matrix", "coils"), [(2048, 8), (4096, 8), (65535, 256)])
def test_huge_matrix_is_refused_at_the_header(matrix: int, coils: int) -> None:
    before, t0 = rss_bytes(), time.perf_counter()
    with pytest.raises(ValueError, match="max_matrix"):
        Assembler(fuzz.header_xml(matrix=(matrix, matrix), channels=coils))
    assert time.perf_counter() - t0 < 1.0
    assert rss_bytes() - before < 32 << 20


def test_the_memory_budget_is_checked_against_the_header() -> None:
    # 512 x 512 x 32 coils x (64 + 1) slices x 8 bytes = 4.4 GB > the 4 GiB default
    xml = fuzz.header_xml(matrix=(512, 512), channels=32, slices=64)
    with pytest.raises(ValueError, match=r"needs 4\.\d GiB of k-space .* max_scan_bytes \(4\.0 GiB\)"):
        Assembler(xml)
    small = wire.WireLimits(max_scan_bytes=1 << 16)
    scan = fuzz.valid_scan()  # 32 x 32 x 2 coils x 2 slices x 8 bytes = 32 KiB: fits
    asm = Assembler(scan.header_xml, limits=small)
    asm.add(scan.readouts[0])
    # a second and a third repetition each need 32 KiB more
    asm.add(_with(scan.readouts[0], repetition=1))
    with pytest.raises(ValueError, match="max_scan_bytes"):
        asm.add(_with(scan.readouts[0], contrast=1))


def test_channels_unknown_in_the_header_are_budgeted_at_the_first_readout() -> None:
    scan = fuzz.valid_scan(coils=2)
    xml = scan.header_xml.replace("<receiverChannels>2</receiverChannels>", "")
    asm = Assembler(xml, limits=wire.WireLimits(max_scan_bytes=1 << 14))
    with pytest.raises(ValueError, match="max_scan_bytes"):
        asm.add(scan.readouts[0])
    assert not asm.stores


@pytest.mark.parametrize("field", ["contrast", "repetition"])
def test_contrast_and_repetition_beyond_the_header_limits(field: str) -> None:
    scan = fuzz.valid_scan()
    xml = scan.header_xml.replace(
        "</encodingLimits>",
        "<contrast><minimum>0</minimum><maximum>0</maximum><center>0</center></contrast></encodingLimits>",
    )
    asm = Assembler(xml)
    asm.add(scan.readouts[0])
    asm.add(_with(scan.readouts[0], **{field: INDEX_TOLERANCE}))  # the tolerated one
    with pytest.raises(ValueError, match=f"{field} index 65535 beyond the header"):
        asm.add(_with(scan.readouts[0], **{field: 65535}))
    assert len(asm.stores) == 2


def test_phase_encode_line_and_readout_refused_before_the_first_store() -> None:
    scan = fuzz.valid_scan()
    asm = Assembler(scan.header_xml)
    with pytest.raises(ValueError, match="outside the encoded matrix"):
        asm.add(_with(scan.readouts[0], kspace_encode_step_1=65535))
    long = wire.Acquisition(scan.readouts[0].head, np.ones((2, 64), np.complex64), scan.readouts[0].traj)
    with pytest.raises(ValueError, match="do not fit a readout"):
        asm.add(long)
    assert not asm.stores  # nothing was allocated for either


def test_header_channels_beyond_the_limit() -> None:
    with pytest.raises(ValueError, match="receiverChannels 100000"):
        Assembler(fuzz.header_xml(channels=100000))


def test_nan_readout_is_refused() -> None:
    scan = fuzz.valid_scan()
    asm = Assembler(scan.header_xml)
    data = scan.readouts[3].data.copy()
    data[1, 5] = np.nan
    with pytest.raises(ValueError, match="readout 0 holds NaN or infinite samples"):
        asm.add(wire.Acquisition(scan.readouts[3].head, data, scan.readouts[3].traj))


def test_a_failed_assembler_is_freed_without_the_cyclic_gc() -> None:
    scan = fuzz.valid_scan()
    gc.disable()
    try:
        asm = Assembler(scan.header_xml)
        ref = weakref.ref(asm)
        for acq in scan.readouts[:5]:
            asm.add(acq)
        try:
            asm.add(_with(scan.readouts[6], slice=65535))
        except ValueError as exc:
            assert "slice index" in str(exc)
        del asm
        assert ref() is None
    finally:
        gc.enable()
