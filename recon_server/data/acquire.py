"""Simulated acquisition: slice geometry, coil sensitivities, noise, k-space, and the subject files.

One subject (:func:`simulate_subject`):

1. Anatomy (:mod:`.phantom`) sampled at the pixel centres of a 2-D multi-slice axial stack,
   ISMRMRD geometry: readout (columns) left-right, phase encode (rows) anterior-posterior,
   ``read_dir = (1, 0, 0)``, ``phase_dir = (0, 1, 0)``, ``slice_dir = (0, 0, 1)`` in LPS, tilted
   about the readout axis by ``tilt_deg``; pixel ``(row i, col j)`` of slice ``s`` lies at
   ``position_s + (j - nx/2 + 0.5) dx read_dir + (i - ny/2 + 0.5) dy phase_dir``.
2. Truth ``x = (sum_k p_k S_k) * bias * exp(i phi)`` (:mod:`.contrast`; ``phi`` a smooth
   quadratic background phase per slice).
3. Coils: Biot-Savart fields of circular loops (24 segments, radius set by the spacing) on an
   elliptic cylinder around the head (1, 2 or 4 rings), ``S_c ~ B_x - i B_y``, computed on a
   24 x 24 grid per slice, upsampled bicubically, and normalised so ``sum_c |S_c|^2 = 1``.
4. K-space ``y_c = F(pad_x(S_c x)) + n_c``: the image is zero padded along the readout by the
   oversampling factor (encodedSpace x = ``os * nx``), ``F`` the centred orthonormal 2-D FFT.
   Noise ``n = sigma L w``, ``w ~ CN(0, I)``, coil covariance ``Psi = L L^H`` with mean diagonal
   1 and correlations about 0.1-0.3; ``sigma = mean(|x| in WM) / SNR``. The noise scan holds
   ``sigma L w`` samples too.
5. Undersampling: the fastMRI equispaced mask (:mod:`.masks`); ``raw.h5`` holds only the
   acquired lines (the same noisy samples as ``reference.h5``, which holds every line).

The coils and their noise are :mod:`.coils`; the header and acquisitions of the files :mod:`.ismrmrd_raw`.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recon_server.data import contrast as cmod
from recon_server.data import phantom
from recon_server.data.coils import coil_sensitivities, complex_noise, noise_mixing, prewhitened_coil_weight
from recon_server.data.ismrmrd_raw import NOISE_ACQUISITIONS, acquisitions, build_header
from recon_server.mrd.ismrmrd_io import write_raw
from recon_server.recon.fft import fft2c
from recon_server.recon.masks import default_center_fraction, equispaced_mask
from recon_server.scan import SliceGeometry

_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0], dtype=np.float32)
READ_DIR = np.array([1.0, 0.0, 0.0])
PHASE_DIR = np.array([0.0, 1.0, 0.0])
SLICE_DIR = np.array([0.0, 0.0, 1.0])


@dataclass(frozen=True)
class SimulationConfig:
    """Settings of one simulated data set (validated on construction).

    ``snr`` None draws 30-40 per subject. ``tr``/``te``/``ti`` (ms) override the protocol draw.
    ``lesion_count`` None draws 1-3 when ``lesions`` is set. ``acs_calibration_only``: flag the
    ACS lines off the regular sampling grid PARALLEL_CALIBRATION (calibration only, GRAPPA style)
    instead of PARALLEL_CALIBRATION_AND_IMAGING (fastMRI style: every acquired line is data).
    """

    contrast: str = "FLAIR"
    matrix: int = 256
    slices: int = 16
    coils: int = 16
    acceleration: int = 4
    lesions: bool = False
    lesion_count: int | None = None
    snr: float | None = None
    fov_mm: float = 240.0
    slice_thickness_mm: float = 5.0
    readout_oversampling: int = 2
    tilt_deg: float = 0.0
    center_fraction: float | None = None
    tr: float | None = None
    te: float | None = None
    ti: float | None = None
    acs_calibration_only: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "contrast", cmod.check_contrast(self.contrast))
        if self.matrix < 16 or self.matrix % 2:
            raise ValueError(f"matrix must be an even number >= 16, got {self.matrix}")
        if not 1 <= self.slices <= 128:
            raise ValueError(f"slices must be in [1, 128], got {self.slices}")
        if not 1 <= self.coils <= 64:
            raise ValueError(f"coils must be in [1, 64], got {self.coils}")
        if self.readout_oversampling not in (1, 2):
            raise ValueError(f"readout_oversampling must be 1 or 2, got {self.readout_oversampling}")
        if self.snr is not None and not self.snr > 0:
            raise ValueError(f"snr must be positive, got {self.snr}")
        if not 100.0 <= self.fov_mm <= 400.0:
            raise ValueError(f"fov_mm must be in [100, 400], got {self.fov_mm}")
        if not 0.5 <= self.slice_thickness_mm <= 20.0:
            raise ValueError(f"slice_thickness_mm must be in [0.5, 20], got {self.slice_thickness_mm}")
        if abs(self.tilt_deg) > 45.0:
            raise ValueError(f"tilt_deg must be within +-45, got {self.tilt_deg}")
        # Mask and timing checks raise their own ValueErrors early.
        equispaced_mask(self.matrix, self.acceleration, center_fraction=self.center_fraction, offset=0)
        cmod.draw_sequence(self.contrast, np.random.default_rng(0), tr=self.tr, te=self.te, ti=self.ti)


@dataclass
class SimulatedSubject:
    """Everything one subject's files are written from (arrays as described in the module doc).

    truth ``(slices, ny, nx)`` complex64; maps ``(slices, coils, ny, nx)`` complex64; kspace
    ``(slices, coils, ny, os*nx)`` complex64 (every line, noisy); noise ``(coils, samples)``;
    lines bool ``(ny,)`` acquired phase-encode lines; acs ``(start, stop)``; labels: tissue
    fractions and ``LESION`` ``(slices, ny, nx)`` float32.
    """

    subject_id: str
    config: SimulationConfig
    truth: np.ndarray
    maps: np.ndarray
    kspace: np.ndarray
    noise: np.ndarray
    lines: np.ndarray
    imaging_lines: np.ndarray
    acs: tuple[int, int]
    geometry: list[SliceGeometry]
    sequence: cmod.Sequence
    labels: dict[str, np.ndarray]
    metadata: dict[str, object] = field(default_factory=dict)
    coil_weight: np.ndarray | None = None


def _streams(seed: int, index: int) -> dict[str, np.random.Generator]:
    """Independent generators per purpose, so that e.g. the contrast does not change the anatomy."""
    names = ("anatomy", "tissue", "sequence", "lesion", "slab", "phase", "coils", "noise", "mask", "meta")
    return {n: np.random.default_rng([int(seed), int(index), k]) for k, n in enumerate(names)}


def slice_stack(
    config: SimulationConfig, centre_lps: np.ndarray, rng: np.random.Generator
) -> tuple[list[SliceGeometry], np.ndarray]:
    """Slice geometry and pixel centres ``(slices, ny, nx, 3)`` (LPS mm) of the axial stack.

    The slab (spacing ``90 mm / slices``, at least the thickness) is centred on ``centre_lps``
    with a random offset of +-3 mm along the slice normal and +-4 mm in plane.
    """
    tilt = np.deg2rad(config.tilt_deg)
    read = READ_DIR
    phase = np.cos(tilt) * PHASE_DIR + np.sin(tilt) * SLICE_DIR
    normal = np.cross(read, phase)
    spacing = max(phantom.SLAB_COVERAGE_MM / config.slices, config.slice_thickness_mm)
    offset = rng.uniform(-3, 3) * normal + rng.uniform(-4, 4) * read + rng.uniform(-4, 4) * phase
    n, s = config.matrix, config.slices
    dx = config.fov_mm / n
    centres = centre_lps + offset + np.outer(np.arange(s) - (s - 1) / 2.0, spacing * normal)
    u = (np.arange(n) - n / 2 + 0.5) * dx
    pixels = (
        centres[:, None, None, :]
        + u[None, None, :, None] * read[None, None, None, :]
        + u[None, :, None, None] * phase[None, None, None, :]
    )
    fov = (config.fov_mm, config.fov_mm, config.slice_thickness_mm)
    geometry = [
        SliceGeometry(
            position=tuple(float(v) for v in c),  # type: ignore[arg-type]
            read_dir=tuple(float(v) for v in read),  # type: ignore[arg-type]
            phase_dir=tuple(float(v) for v in phase),  # type: ignore[arg-type]
            slice_dir=tuple(float(v) for v in normal),  # type: ignore[arg-type]
            fov_mm=fov,
            slice_index=k,
        )
        for k, c in enumerate(centres)
    ]
    return geometry, pixels.astype(np.float32)


def _background_phase(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth phase per slice: ``a0(z) + a1 x + a2 y + a3 x^2 + a4 y^2 + a5 x y`` (x, y in [-1, 1])."""
    s, ny, nx = shape
    y, x = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    a = rng.normal(0.0, [np.pi, 0.6, 0.6, 0.5, 0.5, 0.4])
    drift = rng.normal(0.0, 0.3)
    z = np.linspace(-1, 1, s)[:, None, None]
    phi = a[0] + drift * z + a[1] * x + a[2] * y + a[3] * x * x + a[4] * y * y + a[5] * x * y
    return phi.astype(np.float32)


def render_truth(
    labels: dict[str, np.ndarray],
    seq: cmod.Sequence,
    tissues: dict[str, cmod.Tissue],
    gd: dict[str, float],
    lesions: list[cmod.Lesion],
    lesion_maps: list[np.ndarray],
) -> np.ndarray:
    """Real signal ``sum_k p_k S_k`` (lesions replace GM/WM fractions), float32 ``(slices, ny, nx)``."""
    shape = labels["WM"].shape
    image = np.zeros(shape, np.float32)
    post = seq.contrast == "T1POST"
    for name in phantom.TISSUES:
        agent = gd.get(name, 0.0) if post else 0.0
        image += labels[name] * np.float32(cmod.signal(seq, tissues[name], agent))
    remaining = {p: labels[p].copy() for p in ("GM", "WM")}
    for lesion, frac in zip(lesions, lesion_maps, strict=True):
        for parent in ("GM", "WM"):
            moved = frac * remaining[parent]
            remaining[parent] -= moved
            s_parent = cmod.signal(seq, tissues[parent])
            s_lesion = cmod.signal(seq, cmod.lesion_tissue(tissues[parent], lesion))
            image += moved * np.float32(s_lesion - s_parent)
    return image


@dataclass
class SubjectTruth:
    """The noiseless part of a simulated subject: anatomy, contrast and the truth image."""

    truth: np.ndarray
    labels: dict[str, np.ndarray]
    geometry: list[SliceGeometry]
    pixels: np.ndarray
    centre_lps: np.ndarray
    params: phantom.AnatomyParams
    sequence: cmod.Sequence
    tissues: dict[str, cmod.Tissue]
    gadolinium: dict[str, float]
    lesions: list[cmod.Lesion]


def render_subject(config: SimulationConfig, *, seed: int, index: int) -> SubjectTruth:
    """Anatomy, contrast, lesions and the complex truth ``(slices, ny, nx)`` of one subject.

    No coils and no noise: this is what the prior trains on (:mod:`recon_server.training.truthset`)
    and what :func:`simulate_subject` acquires.
    """
    rng = _streams(seed, index)
    seeds = phantom.load_seeds()
    params = phantom.draw_anatomy(rng["anatomy"], seeds=seeds)
    seq = cmod.draw_sequence(config.contrast, rng["sequence"], tr=config.tr, te=config.te, ti=config.ti)
    tissues = cmod.draw_tissues(rng["tissue"])
    gd = cmod.draw_gadolinium(rng["tissue"])
    lesions = cmod.draw_lesions(rng["lesion"], count=config.lesion_count) if config.lesions else []
    centre_lps = phantom.slab_centre_subject(params) * _LPS_TO_RAS  # RAS <-> LPS flips x and y
    geometry, pixels = slice_stack(config, centre_lps, rng["slab"])
    slice_dir = np.asarray(geometry[0].slice_dir, np.float32) * _LPS_TO_RAS
    anatomy = phantom.sample_anatomy(
        pixels * _LPS_TO_RAS, slice_dir, config.slice_thickness_mm, params, seeds=seeds
    )
    lesion_maps = [cmod.lesion_fraction(anatomy.template_points, les).mean(axis=1) for les in lesions]
    labels = dict(anatomy.fractions)
    parenchyma = labels["GM"] + labels["WM"]
    labels["LESION"] = np.zeros_like(parenchyma)
    for frac in lesion_maps:
        labels["LESION"] = np.maximum(labels["LESION"], frac * parenchyma)
    magnitude = render_truth(anatomy.fractions, seq, tissues, gd, lesions, lesion_maps) * anatomy.bias
    truth = (magnitude * np.exp(1j * _background_phase(magnitude.shape, rng["phase"]))).astype(np.complex64)
    return SubjectTruth(truth, labels, geometry, pixels, centre_lps, params, seq, tissues, gd, lesions)


def simulate_subject(config: SimulationConfig, *, seed: int, index: int) -> SimulatedSubject:
    """Simulate subject ``index`` of the data set with ``seed`` (deterministic for both)."""
    rng = _streams(seed, index)
    subject = render_subject(config, seed=seed, index=index)
    truth, labels, seq, tissues, gd = (
        subject.truth,
        subject.labels,
        subject.sequence,
        subject.tissues,
        subject.gadolinium,
    )
    lesions, geometry, params = subject.lesions, subject.geometry, subject.params
    maps = coil_sensitivities(subject.pixels, subject.centre_lps, config.coils, rng["coils"])

    wm = labels["WM"] > 0.9
    signal_wm = float(np.abs(truth[wm]).mean()) if wm.any() else float(np.abs(truth).max())
    snr = float(config.snr) if config.snr is not None else float(rng["noise"].uniform(30.0, 40.0))
    sigma = signal_wm / snr
    mix = torch.from_numpy(noise_mixing(config.coils, rng["noise"]))
    s, n = config.slices, config.matrix
    nx_os = n * config.readout_oversampling
    coil_images = torch.from_numpy(maps) * torch.from_numpy(truth)[:, None]
    pad = (nx_os - n) // 2
    kspace = fft2c(torch.nn.functional.pad(coil_images, (pad, pad)))
    white = complex_noise(rng["noise"], (s, config.coils, n, nx_os))
    kspace += sigma * torch.einsum("ij,sjyx->siyx", mix, white)
    noise_white = complex_noise(rng["noise"], (config.coils, NOISE_ACQUISITIONS * nx_os))
    noise = (sigma * (mix @ noise_white)).numpy()
    coil_weight = prewhitened_coil_weight(maps, mix.numpy())

    cf = config.center_fraction
    if cf is None:
        cf = default_center_fraction(config.acceleration)
    lines, imaging, acs = sampling_lines(n, config.acceleration, cf, rng["mask"])
    meta = _subject_metadata(seed, index, rng["meta"], params.age_years)
    metadata: dict[str, object] = {
        **meta,
        "seed": int(seed),
        "index": int(index),
        "contrast": seq.contrast,
        "sequence": {"TR_ms": seq.TR, "TE_ms": seq.TE, "TI_ms": seq.TI, "type": seq.sequence_type},
        "tissues": {k: {"T1_ms": v.T1, "T2_ms": v.T2, "PD": v.PD} for k, v in tissues.items()},
        "gadolinium_mM": gd if seq.contrast == "T1POST" else {},
        "lesions": [cmod.lesion_summary(les) for les in lesions],
        "lesion_count": len(lesions),
        "lesion_voxels": int((labels["LESION"] > 0.5).sum()),
        "anatomy": params.summary(),
        "head_seed": phantom.load_seeds().head_source,
        "snr_wm": snr,
        "noise_sigma": sigma,
        "signal_wm": signal_wm,
        "matrix": n,
        "slices": s,
        "coils": config.coils,
        "acceleration": config.acceleration,
        "center_fraction": cf,
        "acquired_lines": int(lines.sum()),
        "acs": list(acs),
        "readout_oversampling": config.readout_oversampling,
        "fov_mm": config.fov_mm,
        "slice_thickness_mm": config.slice_thickness_mm,
        "tilt_deg": config.tilt_deg,
    }
    return SimulatedSubject(
        subject_id=str(meta["subject_id"]),
        config=config,
        truth=truth,
        maps=maps,
        kspace=kspace.numpy(),
        noise=noise,
        lines=lines,
        imaging_lines=imaging,
        acs=acs,
        geometry=geometry,
        sequence=seq,
        labels=labels,
        metadata=metadata,
        coil_weight=coil_weight,
    )


def sampling_lines(
    ny: int, acceleration: int, center_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Acquired lines, the regular (imaging) grid lines, and the ACS block ``(start, stop)``.

    The mask is :func:`masks.equispaced_mask`; its outer lines follow a grid of spacing
    ``R' = R (num_low - N) / (num_low R - N)`` from ``offset``; ACS lines on that grid are
    calibration-and-imaging lines, the other ACS lines are calibration-only.
    """
    num_low = max(1, round(ny * center_fraction))
    start = (ny - num_low + 1) // 2
    acs = (start, start + num_low)
    if acceleration == 1:
        every = np.ones(ny, dtype=bool)
        return every, every, acs
    spacing = acceleration * (num_low - ny) / (num_low * acceleration - ny)
    offset = int(rng.integers(0, int(np.ceil(spacing))))
    lines = equispaced_mask(ny, acceleration, center_fraction=center_fraction, offset=offset)
    grid = np.zeros(ny, dtype=bool)
    idx = np.round(np.arange(offset, ny - 1, spacing)).astype(np.int64)
    grid[idx[idx < ny]] = True
    centre = np.zeros(ny, dtype=bool)
    centre[acs[0] : acs[1]] = True
    if not np.array_equal(grid | centre, lines):
        raise RuntimeError("masks.equispaced_mask no longer follows its documented grid rule")
    return lines, grid, acs


def _uid(rng: np.random.Generator) -> str:
    """A UUID-derived DICOM UID (``2.25.<128-bit integer>``), deterministic for the generator."""
    return "2.25." + str(int.from_bytes(rng.bytes(16), "big"))


def _subject_metadata(seed: int, index: int, rng: np.random.Generator, age: int) -> dict[str, object]:
    study_day = dt.date(2025, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
    study_time = dt.time(int(rng.integers(7, 19)), int(rng.integers(0, 60)), int(rng.integers(0, 60)))
    birth = study_day - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    subject_id = f"sub-{index:03d}"
    return {
        "subject_id": subject_id,
        "patient_name": f"SIM^S{seed}{subject_id.upper().replace('-', '')}",
        "patient_id": f"SIM{seed:06d}{index:04d}",
        "patient_birthdate": birth.isoformat(),
        "patient_sex": str(rng.choice(["F", "M"])),
        "patient_weight_kg": float(np.round(rng.uniform(50, 100), 1)),
        "study_date": study_day.isoformat(),
        "study_time": study_time.isoformat(),
        "study_instance_uid": _uid(rng),
        "frame_of_reference_uid": _uid(rng),
        "series_instance_uid_root": _uid(rng),
        "accession_number": int(rng.integers(10**7, 10**8)),
        "study_id": str(int(rng.integers(1000, 10000))),
        "measurement_uid": int(rng.integers(1, 2**31)),
    }


SUBJECT_FILES = ("raw", "reference", "truth", "labels")
DEFAULT_SUBJECT_FILES = ("raw", "reference", "truth")


def write_subject(
    subject: SimulatedSubject,
    directory: str | Path,
    *,
    files: tuple[str, ...] | list[str] = DEFAULT_SUBJECT_FILES,
) -> dict[str, Path]:
    """Write ``raw.h5`` (undersampled), ``reference.h5`` (fully sampled), ``truth.npy`` (with
    ``coil_weight.npy``, :func:`prewhitened_coil_weight`), ``labels.npz``
    (tissue fractions and ``LESION``, float32 ``(slices, ny, nx)`` each; for evaluation) (those named
    in ``files``) and always ``subject.json`` into ``directory`` (created; files replaced)."""
    unknown = set(files) - set(SUBJECT_FILES)
    if unknown:
        raise ValueError(f"unknown output files {sorted(unknown)}: expected {', '.join(SUBJECT_FILES)}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    raw_files = (("raw", True, subject.config.acceleration), ("reference", False, 1))
    for name, undersampled, accel in raw_files:
        if name in files:
            paths[name] = out / f"{name}.h5"
            paths[name].unlink(missing_ok=True)  # write_raw appends to an existing file
            heads, data = acquisitions(subject, undersampled=undersampled)
            write_raw(paths[name], build_header(subject, acceleration=accel), heads, data)
    if "truth" in files:
        paths["truth"] = out / "truth.npy"
        np.save(paths["truth"], subject.truth)
        if subject.coil_weight is not None:
            paths["coil_weight"] = out / "coil_weight.npy"
            np.save(paths["coil_weight"], subject.coil_weight)
    if "labels" in files:
        paths["labels"] = out / "labels.npz"
        arrays: dict[str, Any] = {k: v.astype(np.float32) for k, v in subject.labels.items()}
        np.savez_compressed(paths["labels"], **arrays)
    paths["subject"] = out / "subject.json"
    paths["subject"].write_text(json.dumps(subject.metadata, indent=1, sort_keys=True) + "\n")
    return paths
