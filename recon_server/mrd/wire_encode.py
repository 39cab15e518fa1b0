"""Serialising messages: each message's payload as a list of byte chunks (the id is added by wire).

Arrays go out as views of their bytes where numpy allows, so a large image or k-space block is
not copied on its way to the socket. Layouts: :mod:`recon_server.mrd.wire_layout`.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from recon_server.mrd.ismrmrd_io import ACQUISITION_HEADER_DTYPE, IMAGE_HEADER_DTYPE
from recon_server.mrd.wire_layout import (
    BOOL,
    CONFIG_FILE_SIZE,
    IMAGE_TYPE_CODES,
    SAMPLING_DESCRIPTION_SIZE,
    UINT64,
    WAVEFORM_HEADER_DTYPE,
)

if TYPE_CHECKING:  # wire.py encodes through this module, so it imports it
    from recon_server.mrd.wire import Acquisition, ConfigFile, Image, ReconBuffer, ReconData, Waveform

Chunks = list[bytes | memoryview]


def _bytes_of(flat: np.ndarray) -> bytes | memoryview:
    return flat.data.cast("B") if flat.size else b""


def _raw(arr: np.ndarray, dtype: str | np.dtype) -> bytes | memoryview:
    # Cast explicitly (never copy=False: numpy 2 raises when a conversion is needed).
    return _bytes_of(np.ascontiguousarray(arr, dtype=dtype).reshape(-1))


def _fortran(arr: np.ndarray, dtype: str | np.dtype) -> bytes | memoryview:
    return _bytes_of(np.asarray(arr, dtype=dtype).ravel(order="F"))


def text_payload(length: struct.Struct, text: str) -> Chunks:
    raw = text.encode("utf-8")
    return [length.pack(len(raw)), raw]


def config_file_payload(msg: ConfigFile) -> Chunks:
    raw = msg.name.encode("utf-8")
    if len(raw) >= CONFIG_FILE_SIZE:
        raise ValueError(f"config name longer than {CONFIG_FILE_SIZE - 1} bytes")
    return [raw.ljust(CONFIG_FILE_SIZE, b"\x00")]


def acquisition_payload(msg: Acquisition) -> Chunks:
    head = np.array(msg.head, dtype=ACQUISITION_HEADER_DTYPE)
    ch, ns = msg.data.shape
    td = msg.traj.shape[1] if msg.traj.ndim == 2 else 0
    head["active_channels"], head["number_of_samples"], head["trajectory_dimensions"] = ch, ns, td
    return [head.tobytes(), _raw(msg.traj, "<f4"), _raw(msg.data, "<c8")]


def image_payload(msg: Image) -> Chunks:
    data = msg.data if msg.data.ndim == 4 else msg.data.reshape((1,) * (4 - msg.data.ndim) + msg.data.shape)
    code = IMAGE_TYPE_CODES.get(data.dtype.newbyteorder("<"))
    if code is None:
        raise TypeError(f"images of dtype {data.dtype} have no ISMRMRD data_type")
    meta = msg.meta_xml.encode("utf-8")
    head = np.array(msg.head, dtype=IMAGE_HEADER_DTYPE)
    head["data_type"], head["channels"] = code, data.shape[0]
    head["matrix_size"] = (data.shape[3], data.shape[2], data.shape[1])
    head["attribute_string_len"] = len(meta)
    return [head.tobytes(), UINT64.pack(len(meta)), meta, _raw(data, data.dtype)]


def waveform_payload(msg: Waveform) -> Chunks:
    head = np.array(msg.head, dtype=WAVEFORM_HEADER_DTYPE)
    head["channels"], head["number_of_samples"] = msg.data.shape
    return [head.tobytes(), _raw(msg.data, "<u4")]


def _ndarray(arr: np.ndarray, dtype: str | np.dtype) -> Chunks:
    dims = np.asarray(arr.shape, dtype="<u8")
    return [UINT64.pack(arr.ndim), dims.tobytes(), _fortran(arr, dtype)]


def _optional(arr: np.ndarray | None, dtype: str) -> Chunks:
    return [BOOL.pack(False)] if arr is None else [BOOL.pack(True), *_ndarray(arr, dtype)]


def _buffer(buf: ReconBuffer) -> Chunks:
    if len(buf.sampling) != SAMPLING_DESCRIPTION_SIZE:
        raise ValueError(f"sampling description must be {SAMPLING_DESCRIPTION_SIZE} bytes")
    return [
        *_ndarray(buf.data, "<c8"),
        *_optional(buf.trajectory, "<f4"),
        *_optional(buf.density, "<f4"),
        *_ndarray(buf.headers, ACQUISITION_HEADER_DTYPE),
        bytes(buf.sampling),
    ]


def recon_data_payload(msg: ReconData) -> Chunks:
    out: Chunks = [UINT64.pack(len(msg.bits))]
    for bit in msg.bits:
        out += _buffer(bit.data)
        out += [BOOL.pack(False)] if bit.ref is None else [BOOL.pack(True), *_buffer(bit.ref)]
    return out
