"""One (contrast, repetition) of a stream: its preallocated lines, and the KSpaceScan they become.

:class:`ScanStore` is filled by :class:`recon_server.mrd.assemble.Assembler`; :func:`finish_scan`
divides out the averages, finds the calibration region and builds the slices' geometry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from ismrmrd import xsd

from recon_server.mrd.buffers import POOL
from recon_server.mrd.encoding import contrast_label
from recon_server.recon.masks import acceleration_of, acs_region, mask_2d
from recon_server.scan import KSpaceScan, SliceGeometry

log = logging.getLogger(__name__)


class HeadGeometry(NamedTuple):
    """What a slice's first imaging readout says about where and when it was measured."""

    vectors: np.ndarray  # float (12,): position, read, phase, slice directions
    table_position: tuple[float, float, float]
    acquisition_time_stamp: int
    physiology_time_stamp: tuple[int, int, int]

    @classmethod
    def of(cls, head: np.void | np.ndarray) -> HeadGeometry:
        table = head["patient_table_position"]
        physio = head["physiology_time_stamp"]
        return cls(
            vectors=np.concatenate(
                [head["position"], head["read_dir"], head["phase_dir"], head["slice_dir"]]
            ),
            table_position=(float(table[0]), float(table[1]), float(table[2])),
            acquisition_time_stamp=int(head["acquisition_time_stamp"]),
            physiology_time_stamp=(int(physio[0]), int(physio[1]), int(physio[2])),
        )


@dataclass
class ScanStore:
    """Lines of one (contrast, repetition), preallocated at (slices, coils, ny, nx).

    ``kspace`` holds the sum of every measurement of a row and ``counts`` how many there were
    (averages are divided out at the end). ``calib_only`` holds the lines that are calibration
    only (``calibration_lines`` ``calibration``, or a separate reference scan).
    """

    kspace: np.ndarray
    counts: np.ndarray  # uint16 (slices, ny): measurements summed into kspace per row
    imaging: np.ndarray  # bool (ny,), rows holding data
    calibration_rows: np.ndarray  # bool (ny,), rows usable for calibration
    calib_only: np.ndarray | None = None  # (slices, coils, ny, nx) for calibration-only lines
    calib_only_rows: np.ndarray | None = None  # bool (ny,), rows held in calib_only
    geometry: dict[int, HeadGeometry] = field(default_factory=dict)
    slices_seen: set[int] = field(default_factory=set)

    def destination(self, calib_only: bool) -> np.ndarray:
        """The array a line goes to: ``calib_only`` (allocated on first use) or ``kspace``."""
        if not calib_only:
            return self.kspace
        if self.calib_only is None:
            self.calib_only = POOL.zeros(self.kspace.shape)
            self.calib_only_rows = np.zeros(self.kspace.shape[-2], dtype=bool)
        return self.calib_only


@dataclass(frozen=True)
class StreamFacts:
    """What every scan of one stream shares."""

    header_xml: str
    header: xsd.ismrmrdHeader
    config: dict
    fov: tuple[float, float, float]  # reconSpace fieldOfView_mm
    columns: np.ndarray  # bool (recon nx,): readout columns measured
    noise: np.ndarray | None
    measurement_id: str
    measurement_uid: int
    raw_digest: str


def finish_scan(key: tuple[int, int], store: ScanStore, stream: StreamFacts) -> KSpaceScan:
    """The scan of ``store`` (its averages divided out in place)."""
    contrast_index, repetition = key
    if not store.imaging.any():
        raise ValueError(f"contrast {contrast_index} repetition {repetition}: only calibration readouts")
    repeated = np.nonzero(store.counts > 1)
    if repeated[0].size:  # averages: the mean of the measurements of a row
        store.kspace[repeated[0], :, repeated[1], :] /= store.counts[repeated][:, None, None]
    slices = sorted(store.slices_seen)
    # Slices 0..n-1 (the usual case, the tolerated spare slice unused): a view, no copy.
    first = slices == list(range(len(slices)))
    kspace = store.kspace[: len(slices)] if first else store.kspace[slices]
    calib_only = store.calib_only
    if calib_only is not None:
        calib_only = calib_only[: len(slices)] if first else calib_only[slices]
    acs = calibration_region(store)
    return KSpaceScan(
        kspace=kspace,
        mask=mask_2d(store.imaging, kspace.shape[-1]) & stream.columns[None, :],
        acs=acs,
        calibration=_calibration(kspace, calib_only, store.calib_only_rows, acs),
        geometry=_slice_geometry(store, slices, stream.fov),
        header_xml=stream.header_xml,
        noise=stream.noise,
        contrast=contrast_label(stream.header, stream.config, contrast_index=contrast_index),
        acceleration=acceleration_of(store.imaging),
        repetition=repetition,
        contrast_index=contrast_index,
        measurement_id=stream.measurement_id,
        measurement_uid=stream.measurement_uid,
        raw_digest=stream.raw_digest,
    )


def _calibration(
    kspace: np.ndarray,
    calib_only: np.ndarray | None,
    calib_only_rows: np.ndarray | None,
    acs: tuple[int, int],
) -> np.ndarray:
    """The calibration rows: a view of k-space unless calibration-only lines must be merged in
    (a fully sampled scan would otherwise copy all of it)."""
    calibration = kspace[:, :, acs[0] : acs[1], :]
    if calib_only is not None and calib_only_rows is not None:
        rows = np.arange(acs[0], acs[1])
        only = calib_only_rows[rows]
        if only.any():
            calibration = calibration.copy()
            calibration[:, :, only, :] = calib_only[:, :, rows[only], :]
    return calibration


def _slice_geometry(
    store: ScanStore, slices: list[int], fov: tuple[float, float, float]
) -> list[SliceGeometry]:
    """Each slice's geometry from its first imaging readout (identity axes where it had none)."""
    geometry = []
    for sl in slices:
        head = store.geometry.get(sl)
        g = head.vectors if head is not None else np.zeros(12, dtype=np.float32)
        geometry.append(
            SliceGeometry(
                position=(float(g[0]), float(g[1]), float(g[2])),
                read_dir=_unit(g[3:6], (1.0, 0.0, 0.0)),
                phase_dir=_unit(g[6:9], (0.0, 1.0, 0.0)),
                slice_dir=_unit(g[9:12], (0.0, 0.0, 1.0)),
                fov_mm=fov,
                slice_index=sl,
                table_position=head.table_position if head is not None else (0.0, 0.0, 0.0),
                acquisition_time_stamp=head.acquisition_time_stamp if head is not None else 0,
                physiology_time_stamp=head.physiology_time_stamp if head is not None else (0, 0, 0),
            )
        )
    return geometry


def _unit(v: np.ndarray, default: tuple[float, float, float]) -> tuple[float, float, float]:
    norm = float(np.linalg.norm(v))
    if norm < 1e-6:
        return default
    return (float(v[0] / norm), float(v[1] / norm), float(v[2] / norm))


def calibration_region(store: ScanStore) -> tuple[int, int]:
    """The calibration rows: the flagged run, else the fully sampled centre, else (0, 0)."""
    try:
        if store.calibration_rows.any():
            # Calibration-only lines held apart: only the flagged rows (their own block).
            rows = (
                store.calibration_rows
                if store.calib_only is not None
                else store.calibration_rows | store.imaging
            )
            return acs_region(rows, min_lines=2)
        return acs_region(store.imaging, min_lines=4)
    except ValueError as exc:
        log.warning("no calibration region (%s): coil maps cannot be estimated", exc)
        return (0, 0)
