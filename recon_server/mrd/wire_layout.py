"""Byte layouts of the ISMRMRD streaming protocol: length fields, fixed-size headers, data types.

What :mod:`recon_server.mrd.wire` reads and :mod:`recon_server.mrd.wire_encode` writes (the message
table is wire's docstring); the asserts pin the sizes the peers (Gadgetron, FIRE clients) assume.
"""

from __future__ import annotations

import ctypes
import struct

import numpy as np
from ismrmrd.hdf5 import waveform_header_dtype

from recon_server.mrd.ismrmrd_io import ACQUISITION_HEADER_DTYPE, IMAGE_HEADER_DTYPE, field_reader

MESSAGE_ID = struct.Struct("<H")  # uint16 message id
UINT32 = struct.Struct("<I")  # uint32 length of CONFIG_TEXT / HEADER / TEXT
UINT64 = struct.Struct("<Q")  # uint64 length of ERROR, image meta, NDArray ndim / dims
BOOL = struct.Struct("<?")  # 1-byte "optional is present" flag in RECON_DATA
CONFIG_FILE_SIZE = 1024  # char[1024] NUL-padded config name

WAVEFORM_HEADER_DTYPE = np.dtype(waveform_header_dtype)  # 40 bytes, C alignment
ACQ_HEADER_SIZE = ACQUISITION_HEADER_DTYPE.itemsize  # 340
IMAGE_HEADER_SIZE = IMAGE_HEADER_DTYPE.itemsize  # 198
WAVEFORM_HEADER_SIZE = WAVEFORM_HEADER_DTYPE.itemsize  # 40
FLOAT32, COMPLEX64 = np.dtype("<f4"), np.dtype("<c8")
ACQ_SIZES = field_reader(
    ACQUISITION_HEADER_DTYPE, ["number_of_samples", "active_channels", "trajectory_dimensions"]
)


class _SamplingLimit(ctypes.Structure):
    _fields_ = [("min", ctypes.c_uint16), ("center", ctypes.c_uint16), ("max", ctypes.c_uint16)]


class SamplingDescription(ctypes.Structure):
    """Gadgetron's SamplingDescription: float[3] x2, uint16[3] x2, SamplingLimit[3]; 56 bytes."""

    _fields_ = [
        ("encoded_FOV", ctypes.c_float * 3),
        ("recon_FOV", ctypes.c_float * 3),
        ("encoded_matrix", ctypes.c_uint16 * 3),
        ("recon_matrix", ctypes.c_uint16 * 3),
        ("sampling_limits", _SamplingLimit * 3),
    ]


SAMPLING_DESCRIPTION_SIZE = ctypes.sizeof(SamplingDescription)
assert (ACQ_HEADER_SIZE, IMAGE_HEADER_SIZE, WAVEFORM_HEADER_SIZE) == (340, 198, 40)
assert SAMPLING_DESCRIPTION_SIZE == 56

#: ISMRMRD image data_type code -> numpy dtype.
IMAGE_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<u2"),
    2: np.dtype("<i2"),
    3: np.dtype("<u4"),
    4: np.dtype("<i4"),
    5: np.dtype("<f4"),
    6: np.dtype("<f8"),
    7: np.dtype("<c8"),
    8: np.dtype("<c16"),
}
IMAGE_TYPE_CODES = {dtype: code for code, dtype in IMAGE_DTYPES.items()}
