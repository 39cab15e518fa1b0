"""Bulk reading and writing of ISMRMRD HDF5 raw files (and image files).

Layout (the one ismrmrd-python's ``Dataset`` and the C++ library write)::

    /<group>/xml    vlen bytes, shape (1,)       the ISMRMRD XML header
    /<group>/data   compound, shape (n,)         one row per acquisition:
                    head  AcquisitionHeader (340 bytes, packed, see ACQUISITION_HEADER_DTYPE)
                    traj  vlen float32            number_of_samples * trajectory_dimensions
                    data  vlen float32            2 * active_channels * number_of_samples,
                                                  (re, im) pairs, channel-major

Reading goes through h5py on the whole compound dataset at once and views each float32
pair array as complex64; reading acquisition by acquisition through ``ismrmrd.Dataset``
is more than an order of magnitude slower. Images are written as ismrmrd-python's
``Dataset.append_image`` writes them (``header`` / ``attributes`` / ``data`` under one
image group), so ``ismrmrd.Dataset.read_image`` reads them back.

A file that cannot be read as ISMRMRD raw data raises one ValueError naming the file and what
is wrong, the same for every command: ``not an ISMRMRD raw file: PATH (no /dataset/xml)``,
``... (not an HDF5 file)``, ``... (no /dataset/data)``; a missing file raises FileNotFoundError
``no such file: PATH``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
from ismrmrd.hdf5 import acquisition_header_dtype, image_header_dtype

#: numpy view of ``ismrmrd.AcquisitionHeader`` (340 bytes, packed, little-endian).
ACQUISITION_HEADER_DTYPE: np.dtype = np.dtype(acquisition_header_dtype)
#: numpy view of ``ismrmrd.ImageHeader`` (198 bytes, packed, little-endian).
IMAGE_HEADER_DTYPE: np.dtype = np.dtype(image_header_dtype)
#: One HDF5 row: header + vlen trajectory + vlen interleaved float32 data.
ACQUISITION_ROW_DTYPE: np.dtype = np.dtype(
    [
        ("head", ACQUISITION_HEADER_DTYPE),
        ("traj", h5py.vlen_dtype(np.dtype("float32"))),
        ("data", h5py.vlen_dtype(np.dtype("float32"))),
    ]
)
ISMRMRD_VERSION = 1
#: Upper bound on acquisitions read from one file (a guard against corrupt files).
DEFAULT_MAX_ACQUISITIONS = 10_000_000

assert ACQUISITION_HEADER_DTYPE.itemsize == 340
assert IMAGE_HEADER_DTYPE.itemsize == 198


@dataclass
class RawScan:
    """The content of one ISMRMRD raw file.

    acquisition_headers: structured array (``ACQUISITION_HEADER_DTYPE``), one row per acquisition.
    data:                one complex64 ``(active_channels, number_of_samples)`` array per row.
    trajectories:        one float32 ``(number_of_samples, trajectory_dimensions)`` array per
                         row, or None when no acquisition carries a trajectory.
    """

    header_xml: str
    acquisition_headers: np.ndarray
    data: list[np.ndarray]
    trajectories: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.data)


def field_reader(dtype: np.dtype, names: Sequence[str]) -> struct.Struct:
    """A ``struct.Struct`` whose ``unpack_from(record_bytes)`` gives the named scalar fields.

    Names may be dotted for nested fields (``"idx.slice"``). Per streamed readout this is a
    fraction of a microsecond; reading the same fields off a numpy record costs ~0.5 us each.
    """
    codes = {"u1": "B", "u2": "H", "u4": "I", "u8": "Q", "i1": "b", "i2": "h", "i4": "i", "i8": "q"}
    codes |= {"f4": "f", "f8": "d"}
    located = []
    for name in names:
        sub, offset = dtype, 0
        for part in name.split("."):
            if sub.fields is None or part not in sub.fields:
                raise ValueError(f"{name}: no field {part!r} in {sub}")
            sub, at = sub.fields[part][:2]
            offset += at
        if sub.shape or sub.str[1:] not in codes:
            raise ValueError(f"{name} is not a scalar number field")
        if sub.str[0] == ">":
            raise ValueError(f"{name} is big-endian; the reader is little-endian")
        located.append((offset, codes[sub.str[1:]], sub.itemsize))
    if any(b[0] < a[0] + a[2] for a, b in zip(located, located[1:], strict=False)):
        raise ValueError("field names must be distinct and in the order of the record")
    fmt, pos = "<", 0
    for offset, code, size in located:
        fmt += f"{offset - pos}x{code}" if offset > pos else code
        pos = offset + size
    return struct.Struct(fmt)


def new_acquisition_headers(n: int) -> np.ndarray:
    """Return ``n`` zeroed acquisition headers with ``version`` set (a structured array)."""
    if n < 0:
        raise ValueError(f"number of acquisition headers must be >= 0, got {n}")
    headers = np.zeros(n, dtype=ACQUISITION_HEADER_DTYPE)
    headers["version"] = ISMRMRD_VERSION
    return headers


def _as_header_dtype(headers: np.ndarray) -> np.ndarray:
    """Convert a header array read from a file to ``ACQUISITION_HEADER_DTYPE`` by field name."""
    if headers.dtype == ACQUISITION_HEADER_DTYPE:
        return np.ascontiguousarray(headers)
    names = ACQUISITION_HEADER_DTYPE.names or ()
    missing = [name for name in names if name not in (headers.dtype.names or ())]
    if missing:
        raise ValueError(f"acquisition headers lack the ISMRMRD fields {missing}")
    out = np.zeros(headers.shape, dtype=ACQUISITION_HEADER_DTYPE)
    for name in names:
        out[name] = headers[name]
    return out


def not_raw(path: str | Path, why: str) -> ValueError:
    """The error for a file that is not ISMRMRD raw data: ``not an ISMRMRD raw file: PATH (why)``."""
    return ValueError(f"not an ISMRMRD raw file: {path} ({why})")


@contextmanager
def _open_raw(path: str | Path) -> Iterator[h5py.File]:
    """``h5py.File(path, "r")`` with h5py's and HDF5's errors turned into one clear line naming
    ``path`` (also for errors while the file is read inside the block)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if p.is_dir():
        raise not_raw(path, "a directory")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        if not h5py.is_hdf5(p):
            raise not_raw(path, "not an HDF5 file") from None
        raise not_raw(path, f"HDF5 error: {exc}") from None
    try:
        with f:
            yield f
    except (KeyError, TypeError, OSError) as exc:  # a damaged file, or fields of another layout
        raise not_raw(path, f"unreadable: {exc}") from None


def read_header_xml(path: str | Path, *, group: str = "dataset") -> str:
    """Read only the XML header of an ISMRMRD file."""
    with _open_raw(path) as f:
        return _read_xml(f, group, path)


def _read_xml(f: h5py.File, group: str, path: str | Path) -> str:
    if group not in f or not isinstance(f[group], h5py.Group) or "xml" not in f[group]:
        raise not_raw(path, f"no /{group}/xml")
    raw = f[group]["xml"][0]
    text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    return text.rstrip("\x00")


def read_raw(
    path: str | Path, *, group: str = "dataset", max_acquisitions: int = DEFAULT_MAX_ACQUISITIONS
) -> RawScan:
    """Read an ISMRMRD raw file in bulk (one h5py read per field of ``/<group>/data``)."""
    with _open_raw(path) as f:
        header_xml = _read_xml(f, group, path)
        if "data" not in f[group]:
            raise not_raw(path, f"no /{group}/data")
        dset = f[group]["data"]
        n = int(dset.shape[0])
        if n > max_acquisitions:
            raise ValueError(f"{path}: {n} acquisitions exceed the limit of {max_acquisitions}")
        if n == 0:
            return RawScan(header_xml, new_acquisition_headers(0), [], None)
        headers = _as_header_dtype(dset.fields("head")[:])
        flat_data = dset.fields("data")[:]
        flat_traj = dset.fields("traj")[:]
    channels = headers["active_channels"].astype(np.int64)
    samples = headers["number_of_samples"].astype(np.int64)
    dims = headers["trajectory_dimensions"].astype(np.int64)
    data: list[np.ndarray] = []
    for i in range(n):
        values = np.asarray(flat_data[i], dtype=np.float32)
        if values.size != 2 * channels[i] * samples[i]:
            raise ValueError(
                f"{path}: acquisition {i} holds {values.size} floats, header says "
                f"2 x {channels[i]} channels x {samples[i]} samples"
            )
        data.append(values.view(np.complex64).reshape(int(channels[i]), int(samples[i])))
    trajectories: list[np.ndarray] | None = None
    if np.any(dims > 0):
        trajectories = []
        for i in range(n):
            values = np.asarray(flat_traj[i], dtype=np.float32)
            if values.size != samples[i] * dims[i]:
                raise ValueError(
                    f"{path}: acquisition {i} trajectory holds {values.size} floats, header says "
                    f"{samples[i]} samples x {dims[i]} dimensions"
                )
            trajectories.append(values.reshape(int(samples[i]), int(dims[i])))
    return RawScan(header_xml, headers, data, trajectories)


def write_raw(
    path: str | Path,
    header_xml: str,
    acquisition_headers: np.ndarray,
    data: Sequence[np.ndarray] | np.ndarray,
    *,
    group: str = "dataset",
    trajectories: Sequence[np.ndarray] | None = None,
) -> None:
    """Write an ISMRMRD raw file (creates or replaces ``/<group>/xml`` and ``/<group>/data``).

    ``data`` is a sequence of complex ``(channels, samples)`` arrays or one
    ``(n, channels, samples)`` array. ``number_of_samples``, ``active_channels`` and
    ``trajectory_dimensions`` in the written headers are set from the arrays.
    """
    headers = _as_header_dtype(np.asarray(acquisition_headers)).copy()
    n = headers.shape[0]
    if len(data) != n:
        raise ValueError(f"{n} acquisition headers but {len(data)} data arrays")
    if trajectories is not None and len(trajectories) != n:
        raise ValueError(f"{n} acquisition headers but {len(trajectories)} trajectories")
    rows = np.zeros(n, dtype=ACQUISITION_ROW_DTYPE)
    empty = np.zeros(0, dtype=np.float32)
    for i in range(n):
        arr = np.ascontiguousarray(data[i], dtype=np.complex64)
        if arr.ndim != 2:
            raise ValueError(f"acquisition {i}: data must be (channels, samples), got {arr.shape}")
        headers[i]["active_channels"] = arr.shape[0]
        headers[i]["number_of_samples"] = arr.shape[1]
        if headers[i]["available_channels"] < arr.shape[0]:
            headers[i]["available_channels"] = arr.shape[0]
        rows[i]["data"] = arr.view(np.float32).reshape(-1)
        traj = empty
        if trajectories is not None and trajectories[i] is not None and np.size(trajectories[i]) > 0:
            t = np.ascontiguousarray(trajectories[i], dtype=np.float32)
            if t.ndim != 2 or t.shape[0] != arr.shape[1]:
                raise ValueError(f"acquisition {i}: trajectory must be (samples, dims), got {t.shape}")
            headers[i]["trajectory_dimensions"] = t.shape[1]
            traj = t.reshape(-1)
        else:
            headers[i]["trajectory_dimensions"] = 0
        rows[i]["traj"] = traj
    rows["head"] = headers
    with h5py.File(path, "a") as f:
        g = f.require_group(group)
        for name in ("xml", "data"):
            if name in g:
                del g[name]
        xml = g.create_dataset("xml", shape=(1,), dtype=h5py.vlen_dtype(bytes))
        xml[0] = header_xml.encode("utf-8")
        g.create_dataset("data", data=rows, maxshape=(None,), chunks=True)


def _image_group_arrays(
    images: Sequence[ismrmrd.Image],
) -> tuple[np.ndarray, list[str], np.ndarray]:
    if not images:
        raise ValueError("no images to write")
    heads = np.zeros(len(images), dtype=IMAGE_HEADER_DTYPE)
    attributes: list[str] = []
    arrays = []
    for i, image in enumerate(images):
        heads[i] = np.frombuffer(bytes(image.getHead()), dtype=IMAGE_HEADER_DTYPE)[0]
        attributes.append(image.attribute_string or "")
        arrays.append(np.asarray(image.data))
    shapes = {a.shape for a in arrays}
    dtypes = {a.dtype for a in arrays}
    if len(shapes) != 1 or len(dtypes) != 1:
        raise ValueError(f"images in one group must share shape and type, got {shapes} / {dtypes}")
    return heads, attributes, np.stack(arrays)


def write_images(
    path: str | Path, images: Sequence[ismrmrd.Image], *, group: str = "dataset", name: str = "images"
) -> None:
    """Write ISMRMRD images to ``/<group>/<name>/{header,attributes,data}`` (replacing them).

    Complex data is stored as the ``(real, imag)`` compound that ``ismrmrd.Dataset`` uses.
    """
    heads, attributes, stacked = _image_group_arrays(images)
    if np.iscomplexobj(stacked):
        width = stacked.dtype.itemsize // 2
        compound = np.dtype([("real", f"<f{width}"), ("imag", f"<f{width}")])
        stacked = np.ascontiguousarray(stacked).view(compound).reshape(stacked.shape)
    with h5py.File(path, "a") as f:
        g = f.require_group(group)
        if name in g:
            del g[name]
        ig = g.create_group(name)
        ig.create_dataset("header", data=heads, maxshape=(None,))
        ig.create_dataset("attributes", data=np.array(attributes, dtype=object), dtype=h5py.string_dtype())
        ig.create_dataset("data", data=stacked, maxshape=(None, *stacked.shape[1:]))


def read_images(path: str | Path, *, group: str = "dataset", name: str = "images") -> list[ismrmrd.Image]:
    """Read an image group written by :func:`write_images` or ``ismrmrd.Dataset.append_image``."""
    with ismrmrd.Dataset(str(path), group, create_if_needed=False, mode="r") as dset:
        return [dset.read_image(name, i) for i in range(dset.number_of_images(name))]
