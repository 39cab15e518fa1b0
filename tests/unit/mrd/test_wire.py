"""Wire codec: round trips, interop with ismrmrd-python and gadgetron-python, bounded reads."""

from __future__ import annotations

import io
import struct

import ismrmrd
import numpy as np
import pytest
from gadgetron.types import recon_data as gt_recon

from recon_server.mrd import wire, wire_layout
from recon_server.mrd.ismrmrd_io import new_acquisition_headers


def _encode(*msgs: wire.Message) -> io.BytesIO:
    buf = io.BytesIO()
    writer = wire.WireWriter(buf)
    for m in msgs:
        writer.send(m)
    buf.seek(0)
    return buf


def _acq(rng: np.random.Generator, ch: int = 3, ns: int = 10, td: int = 0) -> wire.Acquisition:
    head = new_acquisition_headers(1)[0]
    head["idx"]["kspace_encode_step_1"] = 7
    head["flags"] = 1 << (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION - 1)
    data = (rng.standard_normal((ch, ns)) + 1j * rng.standard_normal((ch, ns))).astype(np.complex64)
    return wire.Acquisition(head, data, rng.standard_normal((ns, td)).astype(np.float32))


def test_text_messages_round_trip_and_strip_nul() -> None:
    msgs = [
        wire.ConfigFile("default.xml"),
        wire.ConfigText("<config/>"),
        wire.Header("<ismrmrdHeader/>"),
        wire.Text("hello"),
        wire.Error("broken"),
        wire.Close(),
    ]
    reader = wire.WireReader(_encode(*msgs))
    assert [reader.read_message() for _ in msgs] == msgs
    with pytest.raises(wire.EndOfStream):
        reader.read_message()
    nul = io.BytesIO(struct.pack("<HI", 3, 6) + b"<a/>\0\0")
    assert wire.WireReader(nul).read_message() == wire.Header("<a/>")


def test_acquisition_round_trip_and_ismrmrd_interop() -> None:
    rng = np.random.default_rng(0)
    acq = _acq(rng, td=2)
    back = wire.WireReader(_encode(acq)).read_message()
    assert isinstance(back, wire.Acquisition)
    np.testing.assert_array_equal(back.data, acq.data)
    np.testing.assert_array_equal(back.traj, acq.traj)
    assert int(back.head["idx"]["kspace_encode_step_1"]) == 7
    assert int(back.head["trajectory_dimensions"]) == 2
    # ismrmrd-python reads what we wrote ...
    buf = _encode(acq)
    buf.read(2)
    theirs = ismrmrd.Acquisition.deserialize_from(buf.read)
    np.testing.assert_array_equal(theirs.data, acq.data)
    assert theirs.idx.kspace_encode_step_1 == 7 and theirs.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
    # ... and we read what ismrmrd-python wrote.
    out = io.BytesIO()
    with ismrmrd.serialization.ProtocolSerializer(out) as ser:
        ser.serialize(theirs)
    out.seek(0)
    mine = wire.WireReader(out).read_message()
    assert isinstance(mine, wire.Acquisition)
    np.testing.assert_array_equal(mine.data, acq.data)


def test_image_readable_by_ismrmrd_deserializer() -> None:
    head = wire.new_image_head()
    head["slice"] = 3
    meta = ismrmrd.Meta({"SeriesDescription": "x"}).serialize()
    data = np.arange(20, dtype=np.float32).reshape(1, 1, 4, 5)
    out = _encode(wire.Image(head, meta, data), wire.Close())
    items = list(ismrmrd.serialization.ProtocolDeserializer(out).deserialize())
    assert len(items) == 1 and isinstance(items[0], ismrmrd.Image)
    np.testing.assert_array_equal(items[0].data, data)
    assert items[0].slice == 3 and items[0].meta["SeriesDescription"] == "x"
    mine = wire.WireReader(_encode(wire.Image(head, meta, data.astype(np.uint16)))).read_message()
    assert isinstance(mine, wire.Image) and mine.data.dtype == np.uint16 and mine.data.shape == (1, 1, 4, 5)


class _GtSink:
    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def write(self, b: bytes) -> None:
        self.buf.write(bytes(b))


def test_recon_data_interop_with_gadgetron_python() -> None:
    rng = np.random.default_rng(1)
    shape = (8, 6, 1, 2, 1, 1, 1)
    data = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    headers = new_acquisition_headers(6).reshape(6, 1, 1, 1, 1)
    headers["idx"]["kspace_encode_step_1"] = np.arange(6).reshape(6, 1, 1, 1, 1)
    ours = wire.ReconData([wire.ReconBit(wire.ReconBuffer(data=data, headers=headers))])
    buf = _encode(ours)
    assert struct.unpack("<H", buf.read(2))[0] == wire.RECON_DATA
    theirs = gt_recon.read_recon_data(buf)
    np.testing.assert_array_equal(theirs.bits[0].data.data, data)
    assert theirs.bits[0].ref is None
    steps = [h.idx.kspace_encode_step_1 for h in theirs.bits[0].data.headers.ravel(order="F")]
    assert steps == list(range(6))
    # Written by gadgetron-python, read by us (with a reference buffer).
    theirs.bits[0].ref = theirs.bits[0].data
    sink = _GtSink()
    gt_recon.write_recon_data(sink, theirs)
    sink.buf.seek(0)
    back = wire.WireReader(sink.buf).read_message()
    assert isinstance(back, wire.ReconData) and back.bits[0].ref is not None
    np.testing.assert_array_equal(back.bits[0].ref.data, data)
    back_steps = back.bits[0].data.headers["idx"]["kspace_encode_step_1"].ravel()
    np.testing.assert_array_equal(back_steps, np.arange(6))


def test_waveform_round_trip() -> None:
    head = np.zeros(1, dtype=wire_layout.WAVEFORM_HEADER_DTYPE)[0]
    msg = wire.Waveform(head, np.arange(12, dtype=np.uint32).reshape(2, 6))
    back = wire.WireReader(_encode(msg)).read_message()
    assert isinstance(back, wire.Waveform)
    np.testing.assert_array_equal(back.data, msg.data)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (struct.pack("<HI", 3, 2**32 - 1), "HEADER length 4294967295 exceeds"),
        (struct.pack("<HQ", 8, 2**64 - 1), "ERROR length .* exceeds"),
        (struct.pack("<H", 77), "unknown or unsupported message id 77"),
        (struct.pack("<HI", 3, 100) + b"<abc", "stream ended inside HEADER: got 4 of 100"),
        (struct.pack("<HQ", wire.RECON_DATA, 2**40), "RECON_DATA has 1099511627776 bits"),
        (struct.pack("<H", 1) + b"x", "stream ended inside CONFIG_FILE"),
        (struct.pack("<HI", 5, 2) + b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_streams_raise_protocol_error(payload: bytes, match: str) -> None:
    with pytest.raises(wire.ProtocolError, match=match):
        wire.WireReader(io.BytesIO(payload)).read_message()


def test_acquisition_limits_checked_before_allocation() -> None:
    rng = np.random.default_rng(2)
    acq = _acq(rng, ch=5)
    small = wire.WireLimits(max_channels=4)
    with pytest.raises(wire.ProtocolError, match="5 active channels, limit is 4"):
        wire.WireReader(_encode(acq), small).read_message()
    head = new_acquisition_headers(1)[0]
    head["number_of_samples"] = 60000
    head["active_channels"] = 2
    raw = struct.pack("<H", wire.ACQUISITION) + head.tobytes()
    with pytest.raises(wire.ProtocolError, match="60000 samples, limit is 32768"):
        wire.WireReader(io.BytesIO(raw)).read_message()
    # A recon-data array whose dims multiply past the byte limit fails on the dims alone.
    dims = struct.pack("<HQ", wire.RECON_DATA, 1) + struct.pack("<Q", 7) + struct.pack("<7Q", *([2**20] * 7))
    with pytest.raises(wire.ProtocolError, match="exceeds the limit"):
        wire.WireReader(io.BytesIO(dims)).read_message()


def test_limits_validate() -> None:
    with pytest.raises(ValueError, match="max_channels must be a positive integer"):
        wire.WireLimits(max_channels=0)
