"""Hostile MRD streams, seeded and reproducible: the fuzz test (tests/integration/mrd/test_fuzz.py)
and the soak benchmark (benchmarks/soak.py) send them to a server.

:func:`valid_scan` builds a small fully sampled Cartesian scan (a disc phantom, smooth coil
sensitivities); :class:`Mutator` derives malformed streams from it, one of :data:`KINDS` each:

``random-bytes``  random bytes, sometimes after a valid CONFIG_FILE
``truncated``     the valid stream cut at a random byte (no CLOSE)
``bit-flips``     the valid stream with a few random bytes changed
``header-field``  a header with a hostile value (matrix 0 / 4096 / 65535, slices 65535, 100000
                  channels, negative or non-numeric fields)
``bad-xml``       header XML that is cut, not XML, or has a NUL / control characters inside
``index``         valid header and readouts, then one readout with a hostile index (slice
                  65535, contrast / repetition 65535, phase-encode line 65535, centre beyond
                  the readout)
``sizes``         a readout whose sample / channel / trajectory counts disagree with its data or
                  exceed the limits
``huge-length``   a length field of 2^32-1 or 2^64-1 (TEXT, HEADER, ERROR, ReconData dims)
``nan``           readouts holding NaN or infinity
``unknown-id``    an unknown message id, or a server-to-client message (IMAGE) sent by the client
``order``         readouts before the header, a second header, CLOSE first
``json``          hostile JSON TEXT (unknown method, samples out of range, deep nesting)
``meas-id``       a valid scan with a 300-character or newline-holding measurement id that fails

Each item says whether a server reading it gets the header and at least one readout
(``sends_data``, :func:`carries_readouts`): such a stream, when it fails, is what a server keeps
as a failed scan.
"""

from __future__ import annotations

import contextvars
import dataclasses
import io
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import numpy as np

from recon_server.mrd import wire
from recon_server.mrd.ismrmrd_io import ACQUISITION_HEADER_DTYPE, new_acquisition_headers
from recon_server.service.stream import PROGRESS_PREFIX

KINDS = (
    "random-bytes",
    "truncated",
    "bit-flips",
    "header-field",
    "bad-xml",
    "index",
    "sizes",
    "huge-length",
    "nan",
    "unknown-id",
    "order",
    "json",
    "meas-id",
)

HEADER_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
<measurementInformation><measurementID>{measurement_id}</measurementID>
<patientPosition>HFS</patientPosition><protocolName>FUZZ_T1</protocolName></measurementInformation>
<experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>
<acquisitionSystemInformation><receiverChannels>{channels}</receiverChannels></acquisitionSystemInformation>
<encoding><encodedSpace><matrixSize><x>{nx}</x><y>{ny}</y><z>1</z></matrixSize>
<fieldOfView_mm><x>220</x><y>220</y><z>5</z></fieldOfView_mm></encodedSpace>
<reconSpace><matrixSize><x>{nx}</x><y>{ny}</y><z>1</z></matrixSize>
<fieldOfView_mm><x>220</x><y>220</y><z>5</z></fieldOfView_mm></reconSpace>
<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{ny_max}</maximum>
<center>{ny_centre}</center></kspace_encoding_step_1>
<slice><minimum>0</minimum><maximum>{slice_max}</maximum><center>0</center></slice>
<repetition><minimum>0</minimum><maximum>0</maximum><center>0</center></repetition>
</encodingLimits><trajectory>cartesian</trajectory></encoding></ismrmrdHeader>"""


@dataclass(frozen=True)
class Scan:
    """A valid scan: header XML and readouts (``phantom`` is the image it shows, (ny, nx))."""

    header_xml: str
    readouts: list[wire.Acquisition]
    phantom: np.ndarray
    matrix: int
    coils: int


def header_xml(
    *,
    matrix: tuple[int, int] = (32, 32),
    channels: int | str = 2,
    slices: int = 1,
    measurement_id: str = "FUZZ_VALID",
) -> str:
    nx, ny = matrix
    return HEADER_TEMPLATE.format(
        measurement_id=measurement_id,
        channels=channels,
        nx=nx,
        ny=ny,
        ny_max=ny - 1,
        ny_centre=ny // 2,
        slice_max=slices - 1,
    )


def valid_scan(*, matrix: int = 32, coils: int = 2, measurement_id: str = "FUZZ_VALID") -> Scan:
    """A fully sampled single-slice scan: disc phantom x smooth coil maps, centred FFT per line."""
    y, x = np.mgrid[:matrix, :matrix] - matrix / 2 + 0.5
    phantom = ((x / (0.4 * matrix)) ** 2 + (y / (0.3 * matrix)) ** 2 < 1).astype(np.float32)
    phantom += 0.5 * ((x / (0.12 * matrix)) ** 2 + ((y - 0.1 * matrix) / (0.1 * matrix)) ** 2 < 1)
    maps = np.stack([np.exp(1j * np.pi * (c + 1) * (x + y) / (4 * matrix)) for c in range(coils)])
    images = (maps * phantom).astype(np.complex64)
    kspace = np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(images, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
    )
    heads = new_acquisition_headers(matrix)
    heads["idx"]["kspace_encode_step_1"] = np.arange(matrix)
    heads["center_sample"] = matrix // 2
    heads["number_of_samples"] = matrix
    heads["active_channels"] = coils
    heads["available_channels"] = coils
    heads["read_dir"] = (1, 0, 0)
    heads["phase_dir"] = (0, 1, 0)
    heads["slice_dir"] = (0, 0, 1)
    heads["sample_time_us"] = 5.0
    heads["measurement_uid"] = 7
    heads["flags"][0] |= 1 << 0  # ACQ_FIRST_IN_ENCODE_STEP1
    heads["flags"][-1] |= 1 << 7  # ACQ_LAST_IN_SLICE
    empty = np.zeros((matrix, 0), np.float32)
    readouts = [
        wire.Acquisition(heads[i], np.ascontiguousarray(kspace[:, i, :]), empty) for i in range(matrix)
    ]
    header = header_xml(matrix=(matrix, matrix), channels=coils, measurement_id=measurement_id)
    return Scan(header, readouts, phantom, matrix, coils)


def encode(messages: list[wire.Message]) -> bytes:
    return b"".join(bytes(chunk) for msg in messages for chunk in wire.encode_message(msg))


def stream(scan: Scan, *, header: str | None = None, readouts: list[wire.Acquisition] | None = None) -> bytes:
    """CONFIG_FILE ``default``, HEADER, the readouts, CLOSE."""
    acqs = scan.readouts if readouts is None else readouts
    return encode([wire.ConfigFile("default"), wire.Header(header or scan.header_xml), *acqs, wire.Close()])


@dataclass(frozen=True)
class Hostile:
    kind: str
    payload: bytes
    sends_data: bool = False  # a server gets a header and readouts from it (carries_readouts)


def exchange(
    address: tuple[str, int], payload: bytes, *, timeout: float = 30.0, half_close: bool = True
) -> tuple[list[str], list[wire.Image]]:
    """Send ``payload`` to a stream server and read its TEXT and IMAGE replies until CLOSE or EOF
    (the server's ``PROGRESS`` lines left out).

    ``half_close``: shut the sending side after the payload, so the server sees the end of a
    stream without CLOSE at once (a server may take a half-closed client of a valid scan for one
    that left).
    """
    texts: list[str] = []
    images: list[wire.Image] = []
    with socket.create_connection(address, timeout=timeout) as sock:
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server gave up on the stream before it was all sent
        stream = sock.makefile("rb")
        reader = wire.WireReader(stream)
        try:
            while not isinstance(msg := reader.read_message(), wire.Close):
                if isinstance(msg, wire.Text) and not msg.text.startswith(PROGRESS_PREFIX):
                    texts.append(msg.text)
                elif isinstance(msg, wire.Image):
                    images.append(msg)
        except (ValueError, OSError):
            pass
        finally:
            stream.close()  # at once, not when a reference cycle is collected
    return texts, images


def carries_readouts(payload: bytes) -> bool:
    """Whether a stream server reading ``payload`` gets a header and at least one readout (what
    it keeps as a failed scan when the stream then fails): read with the server's own session."""
    from recon_server.mrd.client_config import ClientConfigError
    from recon_server.service.session import StreamSession

    session = StreamSession(wire.WireReader(io.BytesIO(payload)), keep_acquisitions=True)
    try:
        # In a context of its own: the session tags the caller's log context with the stream's
        # measurement id, which must not leak into the caller's later log lines.
        contextvars.copy_context().run(session.read)
    except ClientConfigError:
        return False  # refused before the readouts: not a failed scan
    except (ValueError, OSError, RuntimeError):  # RecursionError is a RuntimeError
        pass
    return bool(session.header_xml and session.acquisitions)


def _acq(acq: wire.Acquisition, **fields: int) -> wire.Acquisition:
    head = np.array(acq.head, dtype=acq.head.dtype)
    for name, value in fields.items():
        if name.startswith("idx."):
            head["idx"][name[4:]] = value
        else:
            head[name] = value
    return wire.Acquisition(cast(np.void, head[()]), acq.data, acq.traj)


class Mutator:
    """``Mutator(seed, scan)``; iterate for :class:`Hostile` streams (kinds in turn, then random)."""

    def __init__(self, seed: int, scan: Scan) -> None:
        self.rng = np.random.default_rng(seed)
        self.scan = scan
        self.valid = stream(scan)

    def __iter__(self) -> Iterator[Hostile]:
        i = 0
        while True:
            kind = KINDS[i] if i < len(KINDS) else KINDS[int(self.rng.integers(len(KINDS)))]
            i += 1
            item = getattr(self, "_" + kind.replace("-", "_"))()
            yield dataclasses.replace(item, sends_data=carries_readouts(item.payload))

    def _int(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi))

    def _prefix(self, n: int) -> list[wire.Message]:
        """CONFIG_FILE, HEADER and the first ``n`` readouts."""
        return [wire.ConfigFile("default"), wire.Header(self.scan.header_xml), *self.scan.readouts[:n]]

    def _random_bytes(self) -> Hostile:
        data = self.rng.integers(0, 256, self._int(0, 4096), dtype=np.uint8).tobytes()
        if self.rng.random() < 0.5:
            data = encode([wire.ConfigFile("default")]) + data
        return Hostile("random-bytes", data)

    def _truncated(self) -> Hostile:
        return Hostile("truncated", self.valid[: self._int(1, len(self.valid) - 1)])

    def _bit_flips(self) -> Hostile:
        data = bytearray(self.valid)
        for _ in range(self._int(1, 8)):
            data[self._int(0, len(data))] = self._int(0, 256)
        return Hostile("bit-flips", bytes(data))

    def _header_field(self) -> Hostile:
        choice = self._int(0, 7)
        n = len(self.scan.readouts)
        if choice == 0:
            xml = header_xml(matrix=(4096, 4096), channels=8)
        elif choice == 1:
            xml = header_xml(matrix=(2048, 2048), channels=8)
        elif choice == 2:
            xml = header_xml(matrix=(0, 32), channels=2)
        elif choice == 3:
            xml = header_xml(matrix=(32, 32), channels=2, slices=65535)
        elif choice == 4:
            xml = header_xml(matrix=(32, 32), channels=100000)
        elif choice == 5:
            xml = header_xml(matrix=(32, 32), channels="-3")
        else:
            xml = header_xml(matrix=(65535, 65535), channels=256)
        return Hostile("header-field", stream(self.scan, header=xml, readouts=self.scan.readouts[: n // 2]))

    def _bad_xml(self) -> Hostile:
        xml = self.scan.header_xml
        choice = self._int(0, 4)
        if choice == 0:
            xml = xml[: self._int(1, len(xml) - 1)]
        elif choice == 1:
            xml = "this is not XML <<<" + xml
        elif choice == 2:
            xml = xml.replace("<encoding>", "<encoding>\x01\x02</encoding><encoding>", 1)
        else:
            xml = "<!DOCTYPE x [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;'>]>" + xml
        return Hostile("bad-xml", stream(self.scan, header=xml))

    def _index(self) -> Hostile:
        good = self._int(1, len(self.scan.readouts))
        bad = self.scan.readouts[good]
        field = ["idx.slice", "idx.contrast", "idx.repetition", "idx.kspace_encode_step_1", "center_sample"][
            self._int(0, 5)
        ]
        value = 65535 if field != "center_sample" else 60000
        msgs = [
            *self._prefix(good),
            _acq(bad, **{field: value}),
            *self.scan.readouts[good + 1 :],
            wire.Close(),
        ]
        return Hostile("index", encode(msgs))

    def _sizes(self) -> Hostile:
        good = self._int(1, len(self.scan.readouts))
        raw = bytearray(encode([self.scan.readouts[good]]))
        field, value = [
            ("number_of_samples", 65535),
            ("active_channels", 65535),
            ("trajectory_dimensions", 9),
            ("active_channels", 1),
            ("number_of_samples", 1),
        ][self._int(0, 5)]
        offset = ACQUISITION_HEADER_DTYPE.fields[field][1]  # type: ignore[index]
        struct.pack_into("<H", raw, 2 + offset, value)  # +2: the message id
        payload = encode(self._prefix(good)) + bytes(raw) + encode([wire.Close()])
        return Hostile("sizes", payload)

    def _huge_length(self) -> Hostile:
        choice = self._int(0, 5)
        if choice == 0:
            tail = struct.pack("<HI", wire.TEXT, 2**32 - 1)
        elif choice == 1:
            tail = struct.pack("<HI", wire.HEADER, 2**32 - 1)
        elif choice == 2:
            tail = struct.pack("<HQ", wire.ERROR, 2**64 - 1)
        elif choice == 3:
            tail = struct.pack("<HQQ", wire.RECON_DATA, 1, 7) + struct.pack("<7Q", *([2**40] * 7))
        else:
            tail = struct.pack("<HQ", wire.RECON_DATA, 2**63)
        prefix = encode([wire.ConfigFile("default"), wire.Header(self.scan.header_xml)])
        return Hostile("huge-length", prefix + tail)

    def _nan(self) -> Hostile:
        good = self._int(1, len(self.scan.readouts))
        acq = self.scan.readouts[good]
        data = acq.data.copy()
        data.flat[self._int(0, data.size)] = [np.nan, np.inf, -np.inf][self._int(0, 3)]
        msgs = [
            *self._prefix(good),
            wire.Acquisition(acq.head, data, acq.traj),
            *self.scan.readouts[good + 1 :],
        ]
        return Hostile("nan", encode([*msgs, wire.Close()]))

    def _unknown_id(self) -> Hostile:
        n = self._int(0, 4)
        if self.rng.random() < 0.5:
            tail = struct.pack("<H", self._int(9, 1000)) + bytes(64)
        else:
            image = wire.Image(wire.new_image_head(), "", np.zeros((1, 1, 4, 4), np.float32))
            tail = encode([image])
        return Hostile("unknown-id", encode(self._prefix(n)) + tail + encode([wire.Close()]))

    def _order(self) -> Hostile:
        choice = self._int(0, 3)
        if choice == 0:
            msgs: list[wire.Message] = [wire.ConfigFile("default"), *self.scan.readouts[:3], wire.Close()]
        elif choice == 1:
            msgs = [*self._prefix(3), wire.Header(self.scan.header_xml), wire.Close()]
        else:
            msgs = [wire.Close(), *self._prefix(3), wire.Close()]
        return Hostile("order", encode(msgs))

    def _json(self) -> Hostile:
        texts = [
            '{"method": "no-such-method"}',
            '{"samples": 100000}',
            '{"samples": true}',
            "[" * 5000 + "]" * 5000,
            '{"parameters": {"config": "\\u202eevil\\n"}}',
        ]
        text = texts[self._int(0, len(texts))]
        msgs: list[wire.Message] = [wire.ConfigFile("default"), wire.Header(self.scan.header_xml)]
        msgs.append(wire.Text(text))
        return Hostile("json", encode([*msgs, *self.scan.readouts, wire.Close()]))

    def _meas_id(self) -> Hostile:
        forged = "FAKE\nERROR forged log line\u202e\u0085"  # controls XML allows
        mid = "M" * 300 if self.rng.random() < 0.5 else forged
        size = (self.scan.matrix, self.scan.matrix)
        xml = header_xml(matrix=size, channels=self.scan.coils, measurement_id=mid)
        good = self._int(1, len(self.scan.readouts))
        tail = struct.pack("<H", 777) + bytes(8)
        msgs: list[wire.Message] = [wire.ConfigFile("default"), wire.Header(xml)]
        msgs += self.scan.readouts[:good]
        return Hostile("meas-id", encode(msgs) + tail)
