"""Tissue parameters, sequence timing, signal equations and ischaemic lesions for the simulator.

Signal of one compartment (signed longitudinal factor, so partial volumes mix physically)::

    spin echo (T1, T1POST, T2):  S = PD (1 - e^{-TR/T1}) e^{-TE/T2}
    inversion recovery (FLAIR):  S = PD (1 - 2 e^{-TI/T1} + e^{-TR/T1}) e^{-TE/T2}
    gadolinium (T1POST):         1/T1' = 1/T1 + r1 C,  1/T2' = 1/T2 + r2 C   (r1 5, r2 6 /mM/s)

and a voxel is ``S = sum_k p_k S_k`` over the compartment fractions ``p_k``; the magnitude is
taken by the reconstruction, not per compartment. FLAIR's TI nulls CSF of the *nominal* T1
(4300 ms): ``TI = T1_csf (ln 2 - ln(1 + e^{-TR/T1_csf}))``; a subject's own CSF T1 differs a
little, leaving a faint residual as on real scanners.

Lesions (ischaemic stroke, acute/subacute) replace a fraction ``L`` of GM and WM by lesion tissue
with ``T1 = parent (1.2-1.4)``, ``T2`` 120-200 ms, ``PD = parent (1.05-1.10)``. Geometry, in
template space so that a lesion deforms with the anatomy: cortical wedges in the MCA, ACA and
PCA territories (a cone from a deep apex to a cortical base, irregular edge) and lacunes
(small ellipsoids in the basal ganglia / internal capsule / thalamus).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

CONTRASTS: tuple[str, ...] = ("T1", "T2", "T1POST", "FLAIR")

#: Nominal 3 T values: T1 ms, T2 ms, PD (fraction of water). Literature in
#: shared/reference/data-and-toolchain.md; bone/dura/vessel/choroid are rough literature values
#: (cortical bone ~no signal; blood in SE partly flow-voided, hence its low effective PD).
NOMINAL_TISSUES: dict[str, tuple[float, float, float]] = {
    "WM": (840.0, 70.0, 0.70),
    "GM": (1600.0, 97.0, 0.81),
    "CSF": (4300.0, 2000.0, 1.00),
    "FAT": (370.0, 130.0, 0.90),
    "MUSCLE": (1400.0, 47.0, 0.80),
    "BONE": (250.0, 1.0, 0.05),
    "DURA": (1000.0, 60.0, 0.60),
    "VESSEL": (1650.0, 150.0, 0.45),
    "CHOROID": (1500.0, 120.0, 0.80),
}
#: Literature ranges that clip the per-subject draws (T1 and T2 in ms).
_T1_RANGE = {"WM": (600.0, 1100.0), "GM": (1200.0, 2000.0), "CSF": (3700.0, 4800.0)}
_T2_RANGE = {"WM": (60.0, 80.0), "GM": (88.0, 105.0), "CSF": (1900.0, 2400.0)}
#: Gadolinium concentration (mM) drawn per subject in each enhancing compartment.
GD_CONCENTRATION_MM: dict[str, tuple[float, float]] = {
    "VESSEL": (0.8, 1.2),
    "CHOROID": (0.4, 0.8),
    "DURA": (0.3, 0.6),
}
R1_PER_MM_MS = 5.0e-3  # gadobutrol at 3 T: r1 ~ 5 /mM/s
R2_PER_MM_MS = 6.0e-3  # r2 ~ 6 /mM/s
CSF_T1_NOMINAL = 4300.0


class Protocol(NamedTuple):
    """A contrast's 3 T protocol: TR and TE ranges (ms), sequence type, protocol name."""

    tr_ms: tuple[float, float]
    te_ms: tuple[float, float]
    sequence_type: str
    name: str


PROTOCOLS: dict[str, Protocol] = {
    "T1": Protocol((400.0, 700.0), (8.0, 15.0), "SpinEcho", "AX_T1"),
    "T1POST": Protocol((400.0, 700.0), (8.0, 15.0), "SpinEcho", "AX_T1POST"),
    "T2": Protocol((4000.0, 6000.0), (80.0, 110.0), "TurboSpinEcho", "AX_T2"),
    "FLAIR": Protocol((9000.0, 11000.0), (80.0, 130.0), "InversionRecovery", "AX_FLAIR"),
}


@dataclass(frozen=True)
class Sequence:
    """Timing of one acquisition (ms). ``TI`` is 0 for sequences without inversion."""

    contrast: str
    TR: float
    TE: float
    TI: float
    flip_deg: float
    sequence_type: str
    protocol_name: str


@dataclass(frozen=True)
class Tissue:
    """Relaxation and proton density of one compartment (ms, ms, fraction)."""

    T1: float
    T2: float
    PD: float


@dataclass(frozen=True)
class Lesion:
    """One ischaemic lesion in template space (RAS mm).

    A wedge spans from ``apex`` (deep) to ``base`` (cortex) with half-width ``width_mm`` at the
    base; a lacune (``kind == "lacune"``) is an ellipsoid at ``base`` with radii ``radii_mm``.
    ``T1_factor``, ``T2_ms``, ``PD_factor`` set the lesion tissue relative to its parent.
    """

    kind: str
    territory: str
    apex: tuple[float, float, float]
    base: tuple[float, float, float]
    width_mm: float
    radii_mm: tuple[float, float, float]
    irregularity: float
    T1_factor: float
    T2_ms: float
    PD_factor: float


def check_contrast(contrast: str) -> str:
    """Return the canonical contrast label or raise ValueError naming the allowed ones."""
    label = contrast.upper()
    if label not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}: expected one of {', '.join(CONTRASTS)}")
    return label


def csf_null_ti(tr_ms: float, t1_csf_ms: float = CSF_T1_NOMINAL) -> float:
    """Inversion time nulling CSF: ``TI = T1 (ln 2 - ln(1 + e^{-TR/T1}))``."""
    return float(t1_csf_ms * (np.log(2.0) - np.log1p(np.exp(-tr_ms / t1_csf_ms))))


def draw_sequence(
    contrast: str,
    rng: np.random.Generator,
    *,
    tr: float | None = None,
    te: float | None = None,
    ti: float | None = None,
) -> Sequence:
    """Draw TR/TE (and the CSF-nulling TI for FLAIR) within the contrast's 3 T protocol ranges.

    Explicit ``tr``/``te``/``ti`` override the draw. Raises ValueError for an unknown contrast,
    non-positive times, ``TE >= TR`` or ``TI >= TR``, or a TI given for a non-inversion sequence.
    """
    label = check_contrast(contrast)
    proto = PROTOCOLS[label]
    tr_draw, te_draw = float(rng.uniform(*proto.tr_ms)), float(rng.uniform(*proto.te_ms))
    tr_ms = float(tr) if tr is not None else tr_draw
    te_ms = float(te) if te is not None else te_draw
    if tr_ms <= 0 or te_ms <= 0:
        raise ValueError(f"TR and TE must be positive, got TR={tr_ms} ms, TE={te_ms} ms")
    if te_ms >= tr_ms:
        raise ValueError(f"impossible timing: TE={te_ms} ms is not shorter than TR={tr_ms} ms")
    if label == "FLAIR":
        ti_ms = float(ti) if ti is not None else csf_null_ti(tr_ms)
        if ti_ms <= 0 or ti_ms >= tr_ms:
            raise ValueError(f"impossible timing: TI={ti_ms} ms must lie in (0, TR={tr_ms} ms)")
    elif ti is not None:
        raise ValueError(f"TI given for {label}, which has no inversion pulse")
    else:
        ti_ms = 0.0
    return Sequence(label, tr_ms, te_ms, ti_ms, 90.0, proto.sequence_type, proto.name)


def draw_tissues(rng: np.random.Generator) -> dict[str, Tissue]:
    """Per-subject parameters around :data:`NOMINAL_TISSUES` (T1 sd 7 %, T2 sd 5 %, PD sd 3 %),
    clipped to the literature ranges for WM, GM and CSF."""
    out: dict[str, Tissue] = {}
    for name, (t1, t2, pd) in NOMINAL_TISSUES.items():
        f1, f2, fp = rng.normal(0.0, [0.07, 0.05, 0.03])
        t1s, t2s = t1 * np.exp(f1), t2 * np.exp(f2)
        if name in _T1_RANGE:
            t1s = float(np.clip(t1s, *_T1_RANGE[name]))
            t2s = float(np.clip(t2s, *_T2_RANGE[name]))
        out[name] = Tissue(float(t1s), float(t2s), float(np.clip(pd * np.exp(fp), 0.0, 1.0)))
    return out


def draw_gadolinium(rng: np.random.Generator) -> dict[str, float]:
    """Gadolinium concentration (mM) per enhancing compartment (see :data:`GD_CONCENTRATION_MM`)."""
    return {name: float(rng.uniform(lo, hi)) for name, (lo, hi) in GD_CONCENTRATION_MM.items()}


def signal(seq: Sequence, tissue: Tissue, gd_mm: float = 0.0) -> float:
    """Signed signal of one compartment (module docstring equations)."""
    r1 = 1.0 / tissue.T1 + R1_PER_MM_MS * gd_mm
    r2 = 1.0 / tissue.T2 + R2_PER_MM_MS * gd_mm
    decay = np.exp(-seq.TE * r2)
    if seq.contrast == "FLAIR":
        mz = 1.0 - 2.0 * np.exp(-seq.TI * r1) + np.exp(-seq.TR * r1)
    else:
        mz = 1.0 - np.exp(-seq.TR * r1)
    return float(tissue.PD * mz * decay)


def lesion_tissue(parent: Tissue, lesion: Lesion) -> Tissue:
    """Lesion tissue replacing ``parent``: T1 and PD scaled, T2 set."""
    return Tissue(parent.T1 * lesion.T1_factor, lesion.T2_ms, min(1.0, parent.PD * lesion.PD_factor))


# Territory base-point boxes (template RAS mm, right hemisphere; mirrored for the left) and apex
# targets (the wedge narrows towards them).
_TERRITORIES: dict[str, tuple[tuple[tuple[float, float], ...], tuple[float, float, float]]] = {
    "MCA": (((52.0, 62.0), (-45.0, 25.0), (0.0, 40.0)), (22.0, -10.0, 15.0)),
    "ACA": (((6.0, 14.0), (-20.0, 40.0), (35.0, 60.0)), (12.0, 0.0, 20.0)),
    "PCA": (((8.0, 28.0), (-92.0, -75.0), (-5.0, 20.0)), (15.0, -45.0, 8.0)),
}
_LACUNE_BOX = ((14.0, 28.0), (-22.0, 14.0), (-2.0, 20.0))


def _xyz(v: np.ndarray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def draw_lesions(rng: np.random.Generator, *, count: int | None = None) -> list[Lesion]:
    """Draw 1-3 lesions (or ``count``): 70 % cortical wedges (MCA 50 %, ACA 20 %, PCA 30 %),
    30 % lacunes; side, size (wedge base half-width 8-22 mm, lacune radii 3-8 mm) at random."""
    n = int(rng.integers(1, 4)) if count is None else int(count)
    if n < 0:
        raise ValueError(f"lesion count must be >= 0, got {n}")
    lesions = []
    for _ in range(n):
        side = 1.0 if rng.random() < 0.5 else -1.0
        tissue = {
            "irregularity": float(rng.uniform(0.15, 0.35)),
            "T1_factor": float(rng.uniform(1.2, 1.4)),
            "T2_ms": float(rng.uniform(120.0, 200.0)),
            "PD_factor": float(rng.uniform(1.05, 1.10)),
        }
        if rng.random() < 0.7:
            territory = str(rng.choice(["MCA", "ACA", "PCA"], p=[0.5, 0.2, 0.3]))
            box, apex = _TERRITORIES[territory]
            base = np.array([rng.uniform(*r) for r in box])
            base[0] *= side
            apex_pt = np.array(apex) * np.array([side, 1.0, 1.0])
            # Shallower wedges reach part of the way to the apex only.
            depth = rng.uniform(0.4, 0.9)
            apex_pt = base + depth * (apex_pt - base)
            width = float(rng.uniform(8, 22))
            lesions.append(
                Lesion("wedge", territory, _xyz(apex_pt), _xyz(base), width, (0.0, 0.0, 0.0), **tissue)  # type: ignore[arg-type]
            )
        else:
            centre = np.array([rng.uniform(*r) for r in _LACUNE_BOX])
            centre[0] *= side
            radii = _xyz(rng.uniform(3.0, 8.0, size=3))
            lesions.append(Lesion("lacune", "deep", _xyz(centre), _xyz(centre), 0.0, radii, **tissue))  # type: ignore[arg-type]
    return lesions


def _edge(distance: np.ndarray, softness: float = 0.15) -> np.ndarray:
    """Soft inside indicator of ``distance <= 1`` (logistic edge)."""
    return (1.0 / (1.0 + np.exp(np.clip((distance - 1.0) / softness, -50, 50)))).astype(np.float32)


def lesion_fraction(points: np.ndarray, lesion: Lesion) -> np.ndarray:
    """Soft lesion indicator in [0, 1] at template points ``(..., 3)`` (RAS mm).

    Wedge: with axis ``u`` from apex to base and ``t`` the normalised position along it, a point
    is inside when ``0 <= t <= 1.15`` and its distance from the axis is below ``t * width``; a
    smooth angular ripple (amplitude ``irregularity``) roughens the edge.
    """
    apex, base = np.asarray(lesion.apex, np.float32), np.asarray(lesion.base, np.float32)
    rel = points - (base if lesion.kind == "lacune" else apex)
    if lesion.kind == "lacune":
        d = np.sqrt(((rel / np.asarray(lesion.radii_mm, np.float32)) ** 2).sum(-1))
        ripple = 1.0 + lesion.irregularity * 0.5 * np.sin(0.4 * rel[..., 0] + 0.3 * rel[..., 2])
        return _edge(d / ripple)
    axis = base - apex
    length = float(np.linalg.norm(axis))
    u = axis / length
    t = (rel @ u) / length
    radial = np.linalg.norm(rel - (rel @ u)[..., None] * u, axis=-1)
    ripple = 1.0 + lesion.irregularity * np.sin(0.25 * rel[..., 0] + 0.21 * rel[..., 1] - 0.17 * rel[..., 2])
    half_width = np.maximum(t, 0.05) * lesion.width_mm * ripple
    inside_cone = radial / np.maximum(half_width, 1e-3)
    along = np.abs(t - 0.575) / 0.575  # 0 <= t <= 1.15
    return _edge(np.maximum(inside_cone, along))


def lesion_summary(lesion: Lesion) -> dict[str, object]:
    """JSON-friendly lesion description."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(lesion).items()}
