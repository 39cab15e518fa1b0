"""Typed data that crosses module boundaries: one scan's k-space in, one image volume out.

Axis conventions (docs/ARCHITECTURE.md): k-space of a batch is ``(slices, coils, ky, kx)``,
readout is x (columns), phase encode is y (rows); images are ``(slices, rows, cols)``.
Positions and directions are in the ISMRMRD patient coordinate system (LPS, millimetres).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from recon_server.scan_header import ScanHeader, parse_header


@dataclass(frozen=True)
class SliceGeometry:
    """Where one reconstructed slice lies, taken from the ISMRMRD acquisition headers.

    ``position`` is the slice centre (ISMRMRD convention, not DICOM's first voxel).
    ``fov_mm`` is the reconstructed field of view (x = readout, y = phase, z = slice thickness).
    """

    position: tuple[float, float, float]
    read_dir: tuple[float, float, float]
    phase_dir: tuple[float, float, float]
    slice_dir: tuple[float, float, float]
    fov_mm: tuple[float, float, float]
    slice_index: int = 0
    # Acquisition header fields that returned images carry, as Gadgetron's do (from the slice's
    # first imaging readout).
    table_position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    acquisition_time_stamp: int = 0
    physiology_time_stamp: tuple[int, int, int] = (0, 0, 0)


@dataclass
class KSpaceScan:
    """One assembled scan (one contrast and repetition), ready for reconstruction.

    kspace:      complex64 ``(slices, coils, ky, kx)``; lines that were not acquired are zero.
                 Readout oversampling is already removed (kx matches the recon matrix).
    mask:        bool ``(ky, kx)``, True where k-space was acquired (same for every slice).
    acs:         ``(start, stop)`` phase-encode rows of the fully sampled calibration region.
    calibration: complex64 ``(slices, coils, acs_rows, kx)`` calibration data; for
                 separate-reference scans it differs from ``kspace[..., start:stop, :]``,
                 otherwise it may be a view of ``kspace`` (treat both as read-only).
    noise:       complex64 ``(coils, samples)`` noise-scan samples, or None.
    geometry:    one :class:`SliceGeometry` per slice, in slice order.
    contrast:    contrast label (``T1``, ``T2``, ``T1POST``, ``FLAIR``...) or ``""`` if unknown.
    acceleration: nominal acceleration (acquired fraction of phase-encode lines, inverted).
    header_xml:  the ISMRMRD XML header of the scan, unchanged.
    measurement_uid: the readouts' ``measurement_uid`` (returned images carry it).
    raw_digest:  a hex digest of the raw stream's identity (header, line count, first and last
                 readouts): the same scan replayed gives the same digest, two different scans
                 (also without study UID or measurement ID) different ones.
    """

    kspace: np.ndarray
    mask: np.ndarray
    acs: tuple[int, int]
    calibration: np.ndarray
    geometry: list[SliceGeometry]
    header_xml: str
    noise: np.ndarray | None = None
    contrast: str = ""
    acceleration: float = 1.0
    repetition: int = 0
    contrast_index: int = 0
    measurement_id: str = ""
    measurement_uid: int = 0
    raw_digest: str = ""

    @cached_property
    def header(self) -> ScanHeader:
        """The header's typed fields (protocol name, patient, sequence...), parsed on first use."""
        return parse_header(self.header_xml)


@dataclass
class Provenance:
    """What made the images: method, its settings, and the model (if any)."""

    method: str
    settings: dict[str, object] = field(default_factory=dict)
    model_name: str = ""
    model_version: str = ""
    software_version: str = ""


@dataclass
class ImageVolume:
    """A reconstructed magnitude volume with everything the DICOM and MRD writers need.

    magnitude: float32 ``(slices, rows, cols)`` in the scan's own (whitened) intensity units.
    window_center / window_width: display window chosen from the magnitude percentiles.
    series_description: the text that both the ISMRMRD image meta and DICOM carry.
    image_type: DICOM-style ImageType values, e.g. ``["ORIGINAL", "PRIMARY", "OTHER", "M"]``.
    role: ``"image"``, or ``"sd"`` for the per-pixel posterior standard-deviation map that
          diffusion sampling adds when several samples are drawn (``pipeline.reconstruct_all``).
    """

    magnitude: np.ndarray
    geometry: list[SliceGeometry]
    header_xml: str
    provenance: Provenance
    series_description: str
    window_center: float
    window_width: float
    image_type: list[str] = field(default_factory=lambda: ["ORIGINAL", "PRIMARY", "OTHER", "M"])
    series_index: int = 0
    contrast: str = ""
    measurement_id: str = ""
    role: str = "image"
    measurement_uid: int = 0
    raw_digest: str = ""
    scan_header: ScanHeader | None = field(default=None, repr=False, compare=False)

    @cached_property
    def header(self) -> ScanHeader:
        """The scan header's typed fields (what the DICOM writer needs): the scan's, parsed once
        there (``KSpaceScan.header``), else parsed from ``header_xml`` on first use."""
        return self.scan_header if self.scan_header is not None else parse_header(self.header_xml)
