"""ISMRMRD / Gadgetron streaming wire codec: bounded reads, fast numpy paths.

Every message is a little-endian ``uint16`` id followed by an id-specific payload; there is
no outer length, so each length field is checked against :class:`WireLimits` before any
buffer is allocated. Layouts (byte offsets after the id)::

    1    CONFIG_FILE  char[1024], NUL padded
    2    CONFIG_TEXT  uint32 len | len bytes
    3    HEADER       uint32 len | len bytes of ISMRMRD XML
    4    CLOSE        (empty)
    5    TEXT         uint32 len | len bytes (FIRE: "DBG"/"WRN"/"ERR " prefixes are log levels)
    8    ERROR        uint64 len | len bytes   (external peer -> Gadgetron only)
    1008 ACQUISITION  340-byte AcquisitionHeader | float32[ns * traj_dims] | complex64[ch * ns]
    1022 IMAGE        198-byte ImageHeader | uint64 len | meta XML | data (x fastest, y, z, channel)
    1023 RECON_DATA   uint64 nbits | nbits x (ReconBuffer data, bool + ReconBuffer ref)
                      ReconBuffer = NDArray<complex64> data [E0,E1,E2,CHA,N,S,LOC]
                                    | bool + NDArray<float32> trajectory
                                    | bool + NDArray<float32> density
                                    | NDArray<AcquisitionHeader> headers [E1,E2,N,S,LOC]
                                    | 56-byte SamplingDescription
                      NDArray<T>  = uint64 ndim | uint64 dims[ndim] | data in Fortran order
    1026 WAVEFORM     40-byte WaveformHeader | uint32[channels * samples]

Strings lose trailing NULs (FIRE clients count the terminator in the length; a trailing NUL
breaks ``ismrmrd.xsd.CreateFromDocument``). Malformed input raises :class:`ProtocolError`.
The fixed layouts are :mod:`.wire_layout`, the payload encoders :mod:`.wire_encode`.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import numpy as np

from recon_server.mrd.ismrmrd_io import ACQUISITION_HEADER_DTYPE, IMAGE_HEADER_DTYPE
from recon_server.mrd.wire_encode import (
    Chunks,
    acquisition_payload,
    config_file_payload,
    image_payload,
    recon_data_payload,
    text_payload,
    waveform_payload,
)
from recon_server.mrd.wire_layout import (
    ACQ_HEADER_SIZE,
    ACQ_SIZES,
    COMPLEX64,
    CONFIG_FILE_SIZE,
    FLOAT32,
    IMAGE_DTYPES,
    IMAGE_HEADER_SIZE,
    MESSAGE_ID,
    SAMPLING_DESCRIPTION_SIZE,
    UINT32,
    UINT64,
    WAVEFORM_HEADER_DTYPE,
    WAVEFORM_HEADER_SIZE,
)

# Message ids.
CONFIG_FILE = 1
CONFIG_TEXT = 2
HEADER = 3
CLOSE = 4
TEXT = 5
ERROR = 8
ACQUISITION = 1008
IMAGE = 1022
RECON_DATA = 1023
WAVEFORM = 1026

MESSAGE_NAMES = {
    CONFIG_FILE: "CONFIG_FILE",
    CONFIG_TEXT: "CONFIG_TEXT",
    HEADER: "HEADER",
    CLOSE: "CLOSE",
    TEXT: "TEXT",
    ERROR: "ERROR",
    ACQUISITION: "ACQUISITION",
    IMAGE: "IMAGE",
    RECON_DATA: "RECON_DATA",
    WAVEFORM: "WAVEFORM",
}


class ProtocolError(ValueError):
    """The byte stream does not follow the ISMRMRD streaming protocol (or breaks a limit)."""


class EndOfStream(ProtocolError):
    """The peer closed the connection at a message boundary without sending CLOSE."""


@dataclass(frozen=True)
class WireLimits:
    """Upper bounds checked before allocating anything a length field (or, for the ``max_scan_*``,
    ``max_matrix`` and ``max_slices`` fields, the ISMRMRD header) asks for."""

    max_text_bytes: int = 16 << 20  # CONFIG_TEXT, HEADER, TEXT, ERROR
    max_channels: int = 256
    max_samples: int = 32768
    max_trajectory_dimensions: int = 4
    max_image_bytes: int = 1 << 30
    max_meta_bytes: int = 16 << 20
    max_array_bytes: int = 4 << 30  # one NDArray inside RECON_DATA
    max_array_ndim: int = 8
    max_recon_bits: int = 64
    max_waveform_values: int = 1 << 24
    # What one stream's scans may make the assembler allocate (mrd.assemble): k-space of every
    # (contrast, repetition) with calibration and staging, the header's matrix and slices.
    max_scan_bytes: int = 4 << 30
    max_matrix: int = 1024  # phase-encode lines (encodedSpace y) and reconSpace x
    max_slices: int = 1024
    max_scans: int = 64  # (contrast, repetition) scans in one stream

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"WireLimits.{name} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class ConfigFile:
    name: str


@dataclass(frozen=True)
class ConfigText:
    text: str


@dataclass(frozen=True)
class Header:
    xml: str


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Error:
    text: str


@dataclass
class Acquisition:
    """One readout: ``head`` (ACQUISITION_HEADER_DTYPE scalar), ``data`` complex64 (ch, ns),
    ``traj`` float32 (ns, traj_dims)."""

    head: np.void
    data: np.ndarray
    traj: np.ndarray


@dataclass
class Image:
    """One image: ``head`` (IMAGE_HEADER_DTYPE scalar), meta XML, ``data`` (channels, z, y, x)."""

    head: np.void
    meta_xml: str
    data: np.ndarray


@dataclass
class Waveform:
    head: np.void
    data: np.ndarray  # uint32 (channels, samples)


@dataclass
class ReconBuffer:
    """Gadgetron's IsmrmrdDataBuffered: data [E0,E1,E2,CHA,N,S,LOC], headers [E1,E2,N,S,LOC]."""

    data: np.ndarray
    headers: np.ndarray
    sampling: bytes = bytes(SAMPLING_DESCRIPTION_SIZE)
    trajectory: np.ndarray | None = None
    density: np.ndarray | None = None


@dataclass
class ReconBit:
    data: ReconBuffer
    ref: ReconBuffer | None = None


@dataclass
class ReconData:
    bits: list[ReconBit] = field(default_factory=list)


Message = ConfigFile | ConfigText | Header | Close | Text | Error | Acquisition | Image | Waveform | ReconData


# ----------------------------------------------------------------------------- reading


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class WireReader:
    """Reads messages from a binary stream (a file, or ``socket.makefile("rb")``)."""

    def __init__(self, stream: Readable | BinaryIO | io.IOBase, limits: WireLimits | None = None) -> None:
        self.stream: Any = stream
        self.limits = limits or WireLimits()
        self.bytes_read = 0
        self._arrays_bytes: int | None = None  # bytes of the arrays of the RECON_DATA being read
        self._readers: dict[int, Callable[[], Message]] = {
            CONFIG_FILE: self._config_file,
            CONFIG_TEXT: lambda: ConfigText(self._string(UINT32, "CONFIG_TEXT")),
            HEADER: lambda: Header(self._string(UINT32, "HEADER")),
            CLOSE: Close,
            TEXT: lambda: Text(self._string(UINT32, "TEXT")),
            ERROR: lambda: Error(self._string(UINT64, "ERROR")),
            ACQUISITION: self._acquisition,
            IMAGE: self._image,
            RECON_DATA: self._recon_data,
            WAVEFORM: self._waveform,
        }

    def _fill(self, view: memoryview, what: str) -> None:
        total = len(view)
        got = self.stream.readinto(view) or 0  # one call when the bytes are there (the usual case)
        if got == total:
            self.bytes_read += total
            return
        if not got:
            raise ProtocolError(f"stream ended inside {what}: got 0 of {total} bytes")
        while got < total:
            n = self.stream.readinto(view[got:])
            if not n:
                raise ProtocolError(f"stream ended inside {what}: got {got} of {total} bytes")
            got += n
        self.bytes_read += total

    def _bytes(self, n: int, what: str) -> bytearray:
        buf = bytearray(n)
        self._fill(memoryview(buf), what)
        return buf

    def _array(self, shape: int | tuple[int, ...], dtype: np.dtype, what: str) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        if out.size:
            self._fill(out.data.cast("B"), what)
        return out

    def _unpack(self, fmt: struct.Struct, what: str) -> int:
        return int(fmt.unpack(self._bytes(fmt.size, what))[0])

    def _string(self, length_fmt: struct.Struct, what: str) -> str:
        n = self._unpack(length_fmt, f"{what} length")
        if n > self.limits.max_text_bytes:
            raise ProtocolError(f"{what} length {n} exceeds the limit of {self.limits.max_text_bytes} bytes")
        raw = bytes(self._bytes(n, what)).rstrip(b"\x00")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"{what} is not UTF-8 text: {exc}") from None

    def read_message(self) -> Message:
        """Read one message; raise :class:`EndOfStream` if the stream ends before its id."""
        id_buf = bytearray(2)
        n = self.stream.readinto(memoryview(id_buf))
        if not n:
            raise EndOfStream("peer closed the connection without sending CLOSE")
        if n == 1:
            self._fill(memoryview(id_buf)[1:], "message id")
        self.bytes_read += n
        (mid,) = MESSAGE_ID.unpack(id_buf)
        return self.read_payload(mid)

    def read_payload(self, mid: int) -> Message:
        """Read the payload of message ``mid`` (its id already consumed)."""
        reader = self._readers.get(mid)
        if reader is None:
            raise ProtocolError(f"unknown or unsupported message id {mid}")
        return reader()

    def __iter__(self):  # type: ignore[no-untyped-def]
        """Yield messages until CLOSE (not yielded)."""
        while True:
            msg = self.read_message()
            if isinstance(msg, Close):
                return
            yield msg

    def _config_file(self) -> ConfigFile:
        raw = bytes(self._bytes(CONFIG_FILE_SIZE, "CONFIG_FILE"))
        return ConfigFile(raw.split(b"\x00", 1)[0].decode("utf-8", errors="replace"))

    def _acquisition(self) -> Acquisition:
        raw = self._bytes(ACQ_HEADER_SIZE, "acquisition header")
        ns, ch, td = ACQ_SIZES.unpack_from(raw)
        head = np.frombuffer(raw, ACQUISITION_HEADER_DTYPE)[0]
        lim = self.limits
        if ch > lim.max_channels:
            raise ProtocolError(f"acquisition has {ch} active channels, limit is {lim.max_channels}")
        if ns > lim.max_samples:
            raise ProtocolError(f"acquisition has {ns} samples, limit is {lim.max_samples}")
        if td > lim.max_trajectory_dimensions:
            raise ProtocolError(
                f"acquisition has {td} trajectory dimensions, limit is {lim.max_trajectory_dimensions}"
            )
        traj = self._array((ns, td), FLOAT32, "acquisition trajectory")
        data = self._array((ch, ns), COMPLEX64, "acquisition data")
        return Acquisition(head, data, traj)

    def _image(self) -> Image:
        head = np.frombuffer(self._bytes(IMAGE_HEADER_SIZE, "image header"), IMAGE_HEADER_DTYPE)[0]
        code = int(head["data_type"])
        dtype = IMAGE_DTYPES.get(code)
        if dtype is None:
            raise ProtocolError(f"image data_type {code} is not an ISMRMRD type (1-8)")
        nx, ny, nz = (int(v) for v in head["matrix_size"])
        nc = int(head["channels"])
        nbytes = nx * ny * nz * nc * dtype.itemsize
        if nbytes > self.limits.max_image_bytes:
            raise ProtocolError(f"image of {nbytes} bytes exceeds the limit of {self.limits.max_image_bytes}")
        meta_len = self._unpack(UINT64, "image meta length")
        if meta_len > self.limits.max_meta_bytes:
            raise ProtocolError(
                f"image meta length {meta_len} exceeds the limit of {self.limits.max_meta_bytes}"
            )
        meta = bytes(self._bytes(meta_len, "image meta")).rstrip(b"\x00").decode("utf-8", errors="replace")
        data = self._array(nx * ny * nz * nc, dtype, "image data").reshape(nc, nz, ny, nx)
        return Image(head, meta, data)

    def _waveform(self) -> Waveform:
        head = np.frombuffer(self._bytes(WAVEFORM_HEADER_SIZE, "waveform header"), WAVEFORM_HEADER_DTYPE)[0]
        ns, ch = int(head["number_of_samples"]), int(head["channels"])
        if ns * ch > self.limits.max_waveform_values:
            raise ProtocolError(f"waveform of {ch} x {ns} values exceeds the limit")
        return Waveform(head, self._array(ch * ns, np.dtype("<u4"), "waveform data").reshape(ch, ns))

    def _dims(self, what: str) -> tuple[int, ...]:
        ndim = self._unpack(UINT64, f"{what} ndim")
        if ndim > self.limits.max_array_ndim:
            raise ProtocolError(f"{what} has {ndim} dimensions, limit is {self.limits.max_array_ndim}")
        dims = tuple(int(d) for d in self._array(ndim, np.dtype("<u8"), f"{what} dims"))
        return dims

    def _ndarray(self, dtype: np.dtype, what: str) -> np.ndarray:
        dims = self._dims(what)
        count = 1
        for d in dims:
            count *= d  # Python ints: no overflow on hostile dims
            if count * dtype.itemsize > self.limits.max_array_bytes:
                raise ProtocolError(
                    f"{what} of shape {dims} exceeds the limit of {self.limits.max_array_bytes} bytes"
                )
        if self._arrays_bytes is not None:
            self._arrays_bytes += count * dtype.itemsize
            if self._arrays_bytes > self.limits.max_scan_bytes:
                raise ProtocolError(
                    f"RECON_DATA arrays exceed max_scan_bytes ({self.limits.max_scan_bytes} bytes) at {what}"
                )
        return self._array(count, dtype, what).reshape(dims, order="F")

    def _optional(self, read: Callable[[], np.ndarray | ReconBuffer], what: str):  # type: ignore[no-untyped-def]
        flag = self._bytes(1, f"{what} flag")[0]
        if flag > 1:
            raise ProtocolError(f"{what} presence flag is {flag}, expected 0 or 1")
        return read() if flag else None

    def _recon_buffer(self, what: str) -> ReconBuffer:
        data = self._ndarray(np.dtype("<c8"), f"{what} data")
        traj = self._optional(
            lambda: self._ndarray(np.dtype("<f4"), f"{what} trajectory"), f"{what} trajectory"
        )
        dens = self._optional(lambda: self._ndarray(np.dtype("<f4"), f"{what} density"), f"{what} density")
        headers = self._ndarray(ACQUISITION_HEADER_DTYPE, f"{what} headers")
        sampling = bytes(self._bytes(SAMPLING_DESCRIPTION_SIZE, f"{what} sampling description"))
        return ReconBuffer(data=data, headers=headers, sampling=sampling, trajectory=traj, density=dens)

    def _recon_data(self) -> ReconData:
        nbits = self._unpack(UINT64, "RECON_DATA bit count")
        if nbits > self.limits.max_recon_bits:
            raise ProtocolError(f"RECON_DATA has {nbits} bits, limit is {self.limits.max_recon_bits}")
        bits = []
        self._arrays_bytes = 0
        try:
            for i in range(nbits):
                data = self._recon_buffer(f"bit {i}")
                what = f"bit {i} ref"
                ref = self._optional(lambda: self._recon_buffer(what), what)  # noqa: B023 - called at once
                bits.append(ReconBit(data, ref))
        finally:
            self._arrays_bytes = None
        return ReconData(bits)


# ----------------------------------------------------------------------------- writing


class Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


def encode_message(msg: Message) -> list[bytes | memoryview]:
    """Serialise one message into a list of byte chunks (id first)."""
    entry = _ENCODERS.get(type(msg))
    if entry is None:
        raise TypeError(f"no wire encoder for {type(msg).__name__}")
    mid, payload = entry
    return [MESSAGE_ID.pack(mid), *payload(msg)]


_ENCODERS: dict[type, tuple[int, Callable[[Any], Chunks]]] = {
    ConfigFile: (CONFIG_FILE, config_file_payload),
    ConfigText: (CONFIG_TEXT, lambda m: text_payload(UINT32, m.text)),
    Header: (HEADER, lambda m: text_payload(UINT32, m.xml)),
    Close: (CLOSE, lambda m: []),
    Text: (TEXT, lambda m: text_payload(UINT32, m.text)),
    Error: (ERROR, lambda m: text_payload(UINT64, m.text)),
    Acquisition: (ACQUISITION, acquisition_payload),
    Image: (IMAGE, image_payload),
    Waveform: (WAVEFORM, waveform_payload),
    ReconData: (RECON_DATA, recon_data_payload),
}


class WireWriter:
    """Writes messages to a binary stream (a file, or ``socket.makefile("wb")``)."""

    def __init__(self, stream: Writable | BinaryIO | io.IOBase) -> None:
        self.stream: Any = stream
        self.bytes_written = 0

    def send(self, msg: Message, *, flush: bool = True) -> None:
        for chunk in encode_message(msg):
            self.stream.write(chunk)
            self.bytes_written += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
        if flush:
            self.flush()

    def flush(self) -> None:
        flush = getattr(self.stream, "flush", None)
        if flush is not None:
            flush()


def new_image_head() -> np.void:
    """A zeroed ImageHeader scalar with ``version`` 1."""
    head = np.zeros(1, dtype=IMAGE_HEADER_DTYPE)
    head["version"] = 1
    return head[0]
