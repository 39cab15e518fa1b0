"""fastMRI brain multicoil HDF5 files: reader, and a writer of the same layout (for tests).

Layout (fastMRI brain multicoil, ``file_brain_AXFLAIR_200_6002441.h5``)::

    kspace              complex64 (slices, coils, readout, phase)   readout 2x oversampled
    ismrmrd_header      bytes, the ISMRMRD XML header of the scan
    reconstruction_rss  float32 (slices, 320, 320) (train/val files only; optional)
    attrs: acquisition ("AXFLAIR", "AXT1", "AXT1PRE", "AXT1POST", "AXT2"), max, norm, patient_id

fastMRI's k-space axes are (readout, phase) (its masks act on the last axis); this project's are
``(ky, kx)`` = (phase, readout), so the reader transposes the last two axes and the writer
transposes back. :func:`read_fastmri` returns k-space in the project's axis order, readout
oversampling still present (``kx`` = encodedSpace x).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

#: fastMRI ``acquisition`` attribute -> project contrast label.
ACQUISITION_LABELS: dict[str, str] = {
    "AXFLAIR": "FLAIR",
    "AXT1": "T1",
    "AXT1PRE": "T1",
    "AXT1POST": "T1POST",
    "AXT2": "T2",
}
#: Project contrast label -> fastMRI ``acquisition`` attribute (writer).
LABEL_ACQUISITIONS: dict[str, str] = {"FLAIR": "AXFLAIR", "T1": "AXT1", "T1POST": "AXT1POST", "T2": "AXT2"}
MAX_FILE_ELEMENTS = 2_000_000_000  # guard against absurd k-space shapes


@dataclass
class FastMRIScan:
    """One fastMRI file: ``kspace`` complex64 ``(slices, coils, ky, kx)`` (project order)."""

    kspace: np.ndarray
    header_xml: str
    acquisition: str
    contrast: str
    attrs: dict[str, object]


def read_fastmri(path: str | Path) -> FastMRIScan:
    """Read a fastMRI brain multicoil file.

    Raises ValueError for a file without ``kspace``, with k-space that is not 4-D complex, or
    (FileNotFoundError) a missing file. ``contrast`` is ``""`` for an unknown ``acquisition``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fastMRI file not found: {path}")
    with h5py.File(path, "r") as f:
        if "kspace" not in f:
            raise ValueError(f"{path}: not a fastMRI file: no 'kspace' dataset (found {sorted(f.keys())})")
        dset = f["kspace"]
        if dset.ndim != 4:
            raise ValueError(f"{path}: kspace must be 4-D (slices, coils, readout, phase), got {dset.shape}")
        if not np.issubdtype(dset.dtype, np.complexfloating):
            raise ValueError(f"{path}: kspace must be complex, got {dset.dtype}")
        if int(np.prod(dset.shape)) > MAX_FILE_ELEMENTS:
            raise ValueError(f"{path}: kspace shape {dset.shape} exceeds the size limit")
        kspace = np.ascontiguousarray(np.asarray(dset, dtype=np.complex64).transpose(0, 1, 3, 2))
        header = f["ismrmrd_header"][()] if "ismrmrd_header" in f else b""
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    header_xml = header.decode("utf-8") if isinstance(header, bytes) else str(header)
    acquisition = str(attrs.get("acquisition", ""))
    return FastMRIScan(kspace, header_xml, acquisition, ACQUISITION_LABELS.get(acquisition, ""), attrs)


def rss_reconstruction(kspace: np.ndarray, size: int = 320) -> np.ndarray:
    """fastMRI's target: root-sum-of-squares of the coil images, centre-cropped to ``size``.

    ``kspace`` in project order ``(slices, coils, ky, kx)``; the result is in fastMRI's image
    orientation (readout along rows), float32 ``(slices, size', size')`` with ``size'`` capped
    by the image size.
    """
    axes = (-2, -1)
    img = np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(kspace, axes=axes), axes=axes, norm="ortho"), axes=axes
    )
    rss = np.sqrt((np.abs(img) ** 2).sum(axis=1)).transpose(0, 2, 1)
    h, w = rss.shape[-2:]
    ch, cw = min(size, h), min(size, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return rss[:, top : top + ch, left : left + cw].astype(np.float32)


def write_fastmri(
    path: str | Path,
    kspace: np.ndarray,
    header_xml: str,
    contrast: str,
    *,
    patient_id: str = "",
    with_rss: bool = True,
) -> None:
    """Write a fastMRI brain multicoil file from project-order k-space ``(slices, coils, ky, kx)``.

    ``acquisition`` comes from ``contrast`` (:data:`LABEL_ACQUISITIONS`); ``max`` and ``norm``
    are those of the RSS reconstruction (as fastMRI computes them).
    """
    if kspace.ndim != 4:
        raise ValueError(f"kspace must be (slices, coils, ky, kx), got shape {kspace.shape}")
    if contrast not in LABEL_ACQUISITIONS:
        raise ValueError(f"unknown contrast {contrast!r}: expected one of {', '.join(LABEL_ACQUISITIONS)}")
    rss = rss_reconstruction(kspace)
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "kspace", data=np.ascontiguousarray(kspace.transpose(0, 1, 3, 2), dtype=np.complex64)
        )
        f.create_dataset("ismrmrd_header", data=np.bytes_(header_xml.encode("utf-8")))
        if with_rss:
            f.create_dataset("reconstruction_rss", data=rss)
        f.attrs["acquisition"] = LABEL_ACQUISITIONS[contrast]
        f.attrs["max"] = float(rss.max())
        f.attrs["norm"] = float(np.linalg.norm(rss))
        f.attrs["patient_id"] = patient_id
