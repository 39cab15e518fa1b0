"""Brain anatomy for the simulator: tissue seeds from shipped templates, per-subject deformation.

Seeds (built once per process, :func:`load_seeds`), all on the 1 mm MNI152 2009a grid
(197 x 233 x 189, RAS, voxel ``(0, 0, 0)`` at ``(-98, -134, -72)`` mm):

- ``WM``, ``GM``: nilearn's MNI152 2009a probability maps (``/255``).
- ``CSF``: filled brain mask (closing by 4 mm + hole filling, blurred 0.8 mm) ``- GM - WM``,
  plus extra-axial CSF (inside Colin27's intracranial mask but outside the MNI brain).
- ``FAT``, ``MUSCLE``, ``BONE``: Colin27 (``ch2.nii.gz``, same MNI space, integer voxel shift)
  outside the intracranial mask, by T1w intensity (smoothed 0.5 mm): bright ``> 100..140`` ramps
  to fat, dark ``< 35..70`` ramps to bone (and air in sinuses), the rest is skin/muscle.
  Without mricron-data a synthetic shell replaces it (CSF 0-2 mm, bone 2-8 mm, fat 8-12 mm,
  muscle/skin 12-15 mm outside the brain).
- Enhancing structures (the T1-post targets), taken out of their host compartment:
  ``DURA`` (a 1.5 mm shell outside the intracranial surface, and the falx: midline sulcal CSF
  above z = 0), ``VESSEL`` (superior sagittal sinus: midline, within 5 mm outside the vertex;
  cortical veins: the curves where two smooth random fields (fixed seed) both cross zero,
  inside sulcal CSF within 6 mm of the brain surface), ``CHOROID`` (lateral-ventricle CSF within
  10 mm of the atria at ``(+-27, -38, 14)`` mm).
- ``SULCAL``: auxiliary, blurred sulcal CSF (drives GM atrophy).

Per subject (:func:`draw_anatomy`, :func:`sample_anatomy`) a scanner-space point ``s`` (RAS mm,
isocentre at the origin) maps into the template by

    q   = S^-1 R^T (s - t)                                   (affine: rotation, scale, shift)
    q'  = q + d(q)                                           (elastic: smoothed random field)
    q'' = c + (q' - c) (1 - k exp(-|D^-1 (q' - c)|^2 / 2))   (ventricle enlargement, k = 1 - 1/v)

and each tissue map is sampled trilinearly at ``q''``; each slice averages 3 sub-planes across its
thickness (through-plane partial volume). Atrophy then moves a fraction ``a * SULCAL`` of GM to CSF.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

TISSUES: tuple[str, ...] = ("WM", "GM", "CSF", "FAT", "MUSCLE", "BONE", "DURA", "VESSEL", "CHOROID")
_CHANNELS: tuple[str, ...] = (*TISSUES, "SULCAL")
COLIN_PATH = Path("/usr/share/mricron/templates/ch2.nii.gz")
COLIN_BET_PATH = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
_MNI_ORIGIN = np.array([-98.0, -134.0, -72.0])
_COLIN_ORIGIN = np.array([-90.0, -125.0, -71.0])
#: Template point the operator centres the slab on (RAS mm), and the covered z range around it.
SLAB_CENTRE_RAS = np.array([0.0, -18.0, 20.0])
SLAB_COVERAGE_MM = 90.0
_VENTRICLE_CENTRE = np.array([0.0, -10.0, 14.0])
_VENTRICLE_WIDTH = np.array([18.0, 30.0, 16.0])
_ELASTIC_SPACING = 8.0
_SUBPLANES = (-1.0 / 3.0, 0.0, 1.0 / 3.0)


@dataclass(frozen=True)
class Seeds:
    """Tissue maps on the MNI grid: ``volume`` float32 ``(channels, X, Y, Z)``, 1 mm, RAS."""

    volume: torch.Tensor
    origin_ras: np.ndarray
    channels: tuple[str, ...]
    head_source: str


@dataclass(frozen=True)
class AnatomyParams:
    """One subject's anatomy draw (see the module docstring for the maps)."""

    rotation_deg: tuple[float, float, float]
    scale: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    elastic_mm: float
    elastic_field: np.ndarray  # (3, gx, gy, gz) displacement in mm on the 8 mm control grid
    ventricle_scale: float
    atrophy: float
    age_years: int
    bias_coefficients: tuple[float, ...]

    def summary(self) -> dict[str, object]:
        """JSON-friendly summary (the elastic field itself is left out)."""
        return {
            "rotation_deg": list(self.rotation_deg),
            "scale": list(self.scale),
            "shift_mm": list(self.shift_mm),
            "elastic_rms_mm": self.elastic_mm,
            "ventricle_scale": self.ventricle_scale,
            "atrophy": self.atrophy,
            "age_years": self.age_years,
            "bias_coefficients": list(self.bias_coefficients),
        }


@dataclass
class Anatomy:
    """Sampled anatomy of one slab: ``fractions[name]`` float32 ``(slices, rows, cols)``.

    ``template_points`` float32 ``(slices, subplanes, rows, cols, 3)`` are the deformed template
    coordinates (RAS mm) of every sample, for placing template-space objects such as lesions.
    ``bias`` float32 ``(slices, rows, cols)`` is the receive bias field (mean about 1).
    """

    fractions: dict[str, np.ndarray]
    template_points: np.ndarray
    bias: np.ndarray


def _nifti(path: Path) -> np.ndarray:
    import nibabel as nib  # a nilearn dependency; imported lazily (slow import)

    image = nib.load(str(path))
    return np.asarray(image.dataobj, dtype=np.float32)  # type: ignore[attr-defined]


def _mni_path(kind: str) -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("nilearn is not installed: the MNI152 tissue maps ship with it")
    name = f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    return Path(spec.origin).parent / "datasets" / "data" / name


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by a cube of half-width ``radius`` voxels (separable running maxima: about
    a hundred times faster than a distance transform on the 9 M voxel grid; cube vs ball does not
    matter at these few-millimetre radii)."""
    size = 2 * round(radius) + 1
    return ndimage.maximum_filter(np.asarray(mask, dtype=np.uint8), size=size) > 0


def _erode(mask: np.ndarray, radius: float) -> np.ndarray:
    return ~_dilate(~mask, radius)


def _ramp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _ras_grid(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = [np.arange(n, dtype=np.float32) + np.float32(o) for n, o in zip(shape, _MNI_ORIGIN, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    return x, y, z


def _head_from_colin(shape: tuple[int, ...], intracranial_mni: np.ndarray) -> dict[str, np.ndarray]:
    """Intracranial mask and extra-cranial tissues from Colin27 placed on the MNI grid."""
    shift = (_COLIN_ORIGIN - _MNI_ORIGIN).astype(int)
    t1 = np.zeros(shape, np.float32)
    bet = np.zeros(shape, np.float32)
    colin, colin_bet = _nifti(COLIN_PATH), _nifti(COLIN_BET_PATH)
    sl = tuple(slice(s, s + n) for s, n in zip(shift, colin.shape, strict=True))
    t1[sl], bet[sl] = colin, colin_bet
    t1 = ndimage.gaussian_filter(t1, 0.5)
    ic = ndimage.binary_fill_holes(bet > 0) | intracranial_mni
    ic = _erode(_dilate(ic, 2.0), 2.0)
    head = ndimage.gaussian_filter(t1, 1.0) > 30.0
    labels, _ = ndimage.label(head)
    head = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    head = ndimage.binary_fill_holes(head) | ic
    ic_soft = ndimage.gaussian_filter(ic.astype(np.float32), 0.8)
    outside = np.clip(head.astype(np.float32) - ic_soft, 0.0, 1.0)
    fat = outside * _ramp(t1, 100.0, 140.0)
    bone = outside * (1.0 - _ramp(t1, 35.0, 70.0))
    return {"ic": ic, "ic_soft": ic_soft, "FAT": fat, "BONE": bone, "MUSCLE": outside - fat - bone}


def _head_synthetic(brain: np.ndarray) -> dict[str, np.ndarray]:
    """A layered shell when Colin27 is not installed (documented fallback)."""
    dist = ndimage.distance_transform_edt(~brain).astype(np.float32)  # fallback only: slow is fine
    ic = dist <= 2.0
    ic_soft = ndimage.gaussian_filter(ic.astype(np.float32), 0.8)
    shell = lambda lo, hi: _ramp(dist, lo - 0.5, lo + 0.5) * (1.0 - _ramp(dist, hi - 0.5, hi + 0.5))  # noqa: E731
    return {"ic": ic, "ic_soft": ic_soft, "BONE": shell(2, 8), "FAT": shell(8, 12), "MUSCLE": shell(12, 15)}


@functools.lru_cache(maxsize=1)
def load_seeds() -> Seeds:
    """Build (once per process) the tissue seed volumes described in the module docstring."""
    gm, wm = _mni_path("gm"), _mni_path("wm")
    for path in (gm, wm):
        if not path.exists():
            raise FileNotFoundError(f"MNI152 tissue map missing: {path}")
    g, w = _nifti(gm) / 255.0, _nifti(wm) / 255.0
    shape = g.shape
    tissue = (g + w) > 0.5
    brain = ndimage.binary_fill_holes(_erode(_dilate(tissue, 4.0), 4.0))
    brain_soft = ndimage.gaussian_filter(brain.astype(np.float32), 0.8)
    csf = np.clip(brain_soft - g - w, 0.0, 1.0)
    ventricles = ndimage.binary_fill_holes(tissue) & ~tissue
    head_source = "colin27" if COLIN_PATH.exists() and COLIN_BET_PATH.exists() else "synthetic-shell"
    head = _head_from_colin(shape, brain) if head_source == "colin27" else _head_synthetic(brain)
    csf = csf + np.clip(head["ic_soft"] - brain_soft, 0.0, 1.0)
    x, y, z = _ras_grid(shape)
    sulcal = csf * (~ventricles)
    # Enhancing structures (fixed geometry; per-subject variation comes from the deformation).
    ic = head["ic"]
    shell = (_dilate(ic, 2) & ~ic).astype(np.float32)
    # The falx fills the midline fissure from the vertex down to the corpus callosum.
    above_wm = np.flip(np.cumsum(np.flip(w > 0.5, axis=2), axis=2), axis=2) == 0
    falx = (np.abs(x) < 1.2) * (z > 0) * above_wm * sulcal
    dura_host = np.clip(head["BONE"] + head["MUSCLE"], 0.0, None)
    dura = np.minimum(0.7 * shell, dura_host) + 0.6 * falx
    sinus = (np.abs(x) < 4.0) * (_dilate(ic, 5) & ~ic) * (z > 10.0)
    rng = np.random.default_rng(20240601)  # fixed: the vein pattern belongs to the template
    fa = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 4.0)
    fb = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 4.0)
    fa, fb = fa / fa.std(), fb / fb.std()
    surface = ~_erode(brain, 6)
    veins = np.exp(-(fa**2 + fb**2) / (2 * 0.2**2)) * surface * sulcal
    atria = np.minimum((x - 27.0) ** 2, (x + 27.0) ** 2) + (y + 38.0) ** 2 + (z - 14.0) ** 2
    choroid = 0.6 * csf * ventricles * (atria <= 100.0)
    vessel = np.clip(0.8 * veins + sinus * np.maximum(dura_host, csf), 0.0, 1.0)
    # Enhancing compartments take their volume out of the host compartments.
    csf_taken = np.minimum(csf, choroid + 0.6 * falx + 0.8 * veins)
    csf = csf - csf_taken
    outside = dura_host + head["FAT"]
    outside_total = np.maximum(outside, 1e-6)
    outside_taken = np.minimum(outside, np.minimum(0.7 * shell, dura_host) + sinus * dura_host)
    keep = 1.0 - outside_taken / outside_total
    maps = {
        "WM": w,
        "GM": g,
        "CSF": csf,
        "FAT": head["FAT"] * keep,
        "MUSCLE": head["MUSCLE"] * keep,
        "BONE": head["BONE"] * keep,
        "DURA": dura,
        "VESSEL": vessel,
        "CHOROID": choroid,
        "SULCAL": ndimage.gaussian_filter(sulcal, 1.5),
    }
    total = sum(maps[t] for t in TISSUES)
    over = np.maximum(total, 1.0)  # fractions may not exceed 1 after the blurs
    stack = np.stack([maps[c] / (over if c in TISSUES else 1.0) for c in _CHANNELS]).astype(np.float32)
    return Seeds(torch.from_numpy(np.clip(stack, 0.0, 1.0)), _MNI_ORIGIN.copy(), _CHANNELS, head_source)


def _rotation(deg: tuple[float, float, float]) -> np.ndarray:
    a, b, c = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def draw_anatomy(rng: np.random.Generator, *, seeds: Seeds | None = None) -> AnatomyParams:
    """Draw one subject: rotation +-4 deg (pitch +-6), scale +-8 %, shift +-5 mm, elastic 1.5-3.5 mm
    RMS, age 20-85 years driving ventricle size (0.85-1.6) and atrophy (0-0.5), bias coefficients."""
    shape = (seeds or load_seeds()).volume.shape[1:]
    grid = tuple(int(np.ceil((n - 1) / _ELASTIC_SPACING)) + 1 for n in shape)
    age = int(rng.integers(20, 86))
    ageing = (age - 20) / 65.0
    field = rng.standard_normal((3, *grid))
    field = np.stack([ndimage.gaussian_filter(f, 1.5, mode="nearest") for f in field])
    elastic = float(rng.uniform(1.5, 3.5))
    field *= elastic / max(float(np.sqrt((field**2).sum(0).mean())), 1e-9)
    global_scale = rng.uniform(0.94, 1.06)
    return AnatomyParams(
        rotation_deg=(float(rng.uniform(-6, 6)), float(rng.uniform(-4, 4)), float(rng.uniform(-4, 4))),
        scale=tuple(float(global_scale * rng.uniform(0.97, 1.03)) for _ in range(3)),  # type: ignore[arg-type]
        shift_mm=tuple(float(v) for v in rng.uniform(-5, 5, size=3)),  # type: ignore[arg-type]
        elastic_mm=elastic,
        elastic_field=field.astype(np.float32),
        ventricle_scale=float(np.clip(0.9 + 0.6 * ageing**2 + rng.normal(0, 0.07), 0.85, 1.6)),
        atrophy=float(np.clip(0.45 * ageing**1.5 + rng.normal(0, 0.04), 0.0, 0.5)),
        age_years=age,
        bias_coefficients=tuple(float(v) for v in rng.normal(0.0, 0.07, size=9)),
    )


def subject_to_template(points_ras: np.ndarray, params: AnatomyParams) -> np.ndarray:
    """Map scanner-space points (RAS mm, ``(..., 3)``) to template RAS mm (affine + elastic + ventricles)."""
    rot = _rotation(params.rotation_deg)
    q = ((points_ras - np.asarray(params.shift_mm)) @ rot) / np.asarray(params.scale)  # S^-1 R^T (s - t)
    q = q.astype(np.float32)
    field = torch.from_numpy(params.elastic_field)[None]
    extent = (np.asarray(params.elastic_field.shape[1:]) - 1) * _ELASTIC_SPACING
    disp = _sample(field, (q - _MNI_ORIGIN) / extent, normalised=True)
    q = q + np.moveaxis(disp, 0, -1)
    k = 1.0 - 1.0 / params.ventricle_scale
    rel = q - _VENTRICLE_CENTRE
    w = np.exp(-0.5 * ((rel / _VENTRICLE_WIDTH) ** 2).sum(-1, keepdims=True))
    return (_VENTRICLE_CENTRE + rel * (1.0 - k * w)).astype(np.float32)


def _sample(volume: torch.Tensor, coords: np.ndarray, *, normalised: bool = False) -> np.ndarray:
    """Trilinear samples of ``volume`` ``(1, C, X, Y, Z)`` at ``coords`` ``(..., 3)``: voxel indices,
    or fractions of the extent in [0, 1] if ``normalised``. Outside the volume: 0 (fields: edge).

    Returns ``(C, ...)`` float32.
    """
    sizes = np.asarray(volume.shape[2:], dtype=np.float32) - 1.0
    frac = coords if normalised else coords / sizes
    grid = torch.from_numpy(np.ascontiguousarray((2.0 * frac - 1.0)[..., ::-1], dtype=np.float32))
    lead = grid.shape[:-1]
    grid = grid.reshape(1, 1, 1, -1, 3)
    pad = "border" if normalised else "zeros"
    out = torch.nn.functional.grid_sample(volume, grid, mode="bilinear", padding_mode=pad, align_corners=True)
    return out.reshape(volume.shape[1], *lead).numpy()


def _bias(points_ras: np.ndarray, centre: np.ndarray, coefficients: tuple[float, ...]) -> np.ndarray:
    """Smooth receive bias ``exp(sum_i c_i phi_i)``, quadratic polynomial in ``(s - centre) / 100 mm``."""
    u = (points_ras - centre) / 100.0
    x, y, z = u[..., 0], u[..., 1], u[..., 2]
    basis = (x, y, z, x * x - 0.3, y * y - 0.3, z * z - 0.3, x * y, x * z, y * z)
    return np.exp(sum(c * b for c, b in zip(coefficients, basis, strict=True))).astype(np.float32)


def sample_anatomy(
    pixel_ras: np.ndarray,
    slice_dir_ras: np.ndarray,
    thickness_mm: float,
    params: AnatomyParams,
    *,
    seeds: Seeds | None = None,
) -> Anatomy:
    """Sample tissue fractions at the pixel centres ``pixel_ras`` ``(slices, rows, cols, 3)`` (RAS mm).

    Each pixel averages 3 points across the slice thickness along ``slice_dir_ras``.
    """
    seeds = seeds or load_seeds()
    offsets = np.asarray(_SUBPLANES, np.float32)[:, None, None, None] * thickness_mm
    pts = pixel_ras[:, None] + offsets[None] * np.asarray(slice_dir_ras, np.float32)  # (S, P, R, C, 3)
    template = subject_to_template(pts.astype(np.float32), params)
    values = _sample(seeds.volume[None], template - seeds.origin_ras.astype(np.float32))
    maps = dict(zip(seeds.channels, values.mean(axis=2), strict=True))  # average the sub-planes
    gm_lost = params.atrophy * np.clip(maps["SULCAL"], 0.0, 1.0) * maps["GM"]
    maps["GM"] = maps["GM"] - gm_lost
    maps["CSF"] = maps["CSF"] + gm_lost
    centre = np.asarray(params.shift_mm) + _rotation(params.rotation_deg) @ (
        np.asarray(params.scale) * SLAB_CENTRE_RAS
    )
    bias = _bias(pixel_ras, centre, params.bias_coefficients)
    fractions = {name: maps[name].astype(np.float32) for name in TISSUES}
    return Anatomy(fractions=fractions, template_points=template, bias=bias)


def slab_centre_subject(params: AnatomyParams) -> np.ndarray:
    """Where the operator centres the slab: the template's :data:`SLAB_CENTRE_RAS` in this subject."""
    rot = _rotation(params.rotation_deg)
    return np.asarray(params.shift_mm) + rot @ (np.asarray(params.scale) * SLAB_CENTRE_RAS)
