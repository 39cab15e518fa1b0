"""Image Plane geometry: ISMRMRD slice centre and directions -> DICOM first-voxel centre.

ISMRMRD ``position`` is the slice centre; DICOM ImagePositionPatient is the centre of the
first transmitted voxel (row 0, column 0)::

    dx = FOV_x / cols ; dy = FOV_y / rows
    ImagePositionPatient    = position - (cols/2 - 1/2) dx read - (rows/2 - 1/2) dy phase
    ImageOrientationPatient = read \\ phase        PixelSpacing = dy \\ dx (row, column spacing)
    SliceLocation = IPP . slice_dir ;  SpacingBetweenSlices = centre-to-centre distance

Voxel (r, c) then lies at ``IPP + c dx read + r dy phase`` (PS3.3 C.7.6.2.1.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recon_server.scan import SliceGeometry

_GEOMETRY_TOL = 1e-3


@dataclass(frozen=True)
class PlaneGeometry:
    """DICOM Image Plane values of one slice (all in mm, LPS)."""

    position: np.ndarray  # ImagePositionPatient (first voxel centre)
    orientation: np.ndarray  # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float]  # (row spacing dy, column spacing dx)
    slice_thickness: float
    slice_location: float


def _unit(vec: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(vec, dtype=np.float64)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be 3 finite numbers, got {vec!r}")
    norm = float(np.linalg.norm(arr))
    if norm < 1e-6:
        raise ValueError(f"{what} is a zero vector: the header has no usable geometry")
    if abs(norm - 1.0) > 1e-2:
        raise ValueError(f"{what} {vec!r} is not a unit vector (norm {norm:.4f})")
    return arr / norm


def plane_geometry(geom: SliceGeometry, rows: int, cols: int) -> PlaneGeometry:
    """First-voxel-centre geometry of one slice (module docstring formulas)."""
    read = _unit(geom.read_dir, f"slice {geom.slice_index} read_dir")
    phase = _unit(geom.phase_dir, f"slice {geom.slice_index} phase_dir")
    if abs(float(read @ phase)) > _GEOMETRY_TOL:
        raise ValueError(f"slice {geom.slice_index}: read_dir and phase_dir are not orthogonal")
    normal = np.cross(read, phase)
    slice_dir = np.asarray(geom.slice_dir, dtype=np.float64)
    if np.linalg.norm(slice_dir) < 1e-6:
        slice_dir = normal
    else:
        slice_dir = _unit(geom.slice_dir, f"slice {geom.slice_index} slice_dir")
        if abs(abs(float(slice_dir @ normal)) - 1.0) > _GEOMETRY_TOL:
            raise ValueError(f"slice {geom.slice_index}: slice_dir is not normal to read/phase")
    fov = np.asarray(geom.fov_mm, dtype=np.float64)
    if fov.shape != (3,) or not np.all(np.isfinite(fov)) or fov[0] <= 0 or fov[1] <= 0:
        raise ValueError(f"slice {geom.slice_index}: field of view {geom.fov_mm!r} must be positive")
    centre = np.asarray(geom.position, dtype=np.float64)
    if centre.shape != (3,) or not np.all(np.isfinite(centre)):
        raise ValueError(f"slice {geom.slice_index}: position {geom.position!r} must be 3 finite numbers")
    dx, dy = fov[0] / cols, fov[1] / rows
    ipp = centre - (cols / 2 - 0.5) * dx * read - (rows / 2 - 0.5) * dy * phase
    return PlaneGeometry(
        position=ipp,
        orientation=np.concatenate([read, phase]),
        pixel_spacing=(float(dy), float(dx)),
        slice_thickness=float(fov[2]) if fov[2] > 0 else 0.0,
        slice_location=float(ipp @ slice_dir),
    )


def slice_spacing(planes: Sequence[PlaneGeometry]) -> float | None:
    """Centre-to-centre distance along the normal if uniform (0.01 mm), else None."""
    if len(planes) < 2:
        return None
    normal = np.cross(planes[0].orientation[:3], planes[0].orientation[3:])
    steps = [abs(float((b.position - a.position) @ normal)) for a, b in zip(planes, planes[1:], strict=False)]
    if max(steps) - min(steps) > 0.01 or min(steps) <= 0:
        return None
    return float(np.mean(steps))
