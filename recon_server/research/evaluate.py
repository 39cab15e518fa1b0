"""Evaluation on held-out simulated subjects: methods x accelerations -> metrics, tables, montages.

Data: directories written by ``recon-server simulate`` (``DIR/sub-XXX/``): ``reference.h5`` (every
phase-encode line, noisy, with its noise scan), ``truth.npy`` (noiseless complex image) and,
optionally, ``labels.npz`` (tissue fractions and ``LESION``; ``simulate --files ...,labels``).

Protocol (per subject, per acceleration R):

1. The fully sampled scan is assembled by the service's own assembler (readout oversampling
   removed, noise scan kept) and retrospectively undersampled with the fastMRI equispaced mask at R
   (``recon.masks.equispaced_mask``, centre fraction 0.08 for R <= 4 and 0.04 above but at least
   :data:`MIN_ACS_LINES` lines, the first outer line at offset 0): k-space zeroed off the mask,
   ACS = the fully sampled centre block.
2. Each method runs through ``pipeline.reconstruct_all`` (prewhitening, ESPIRiT, method), exactly as
   the service runs it. BART ``pics`` (``--bart``, when the binary exists) gets the same prewhitened
   undersampled k-space and estimates its own maps (``ecalib -m1``).
3. Metrics (``recon_server.research.quality``): NRMSE, PSNR, SSIM of the magnitude against the reference
   ``|truth| x coil_weight`` (``coil_weight.npy``, :func:`recon_server.data.coils.prewhitened_coil_weight`:
   after prewhitening, coil combination returns the object times ``||L^-1 S||``, a smooth +-15 %
   weighting no method can undo; against ``|truth|`` alone that weighting was 0.09 of every
   method's NRMSE even fully sampled) over the whole image, after a least-squares real scale fit
   (``fit_scale=True``: the pipeline normalises intensities, BART rescales, the simulator has its
   own units; the fit is the same for all).
4. Lesion-to-white-matter contrast ``C = (mean_lesion - mean_wm) / mean_wm`` of the magnitude
   (lesion: ``LESION > 0.5``; white matter: ``WM > 0.9`` outside lesions), when labels exist, and
   its relative error against ``C`` of the truth.

Outputs (``out_dir``): ``results.json`` (every number, per subject), ``results.md`` (mean +- sd per
method and R), ``montage_R<R>.png`` (middle slice of the first subject: truth and each method on
the truth's grey scale, then 5x absolute error maps).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from recon_server.recon.masks import acceleration_of, default_center_fraction, equispaced_mask, mask_2d
from recon_server.recon.methods import DiffusionSettings
from recon_server.research import quality
from recon_server.scan import KSpaceScan

log = logging.getLogger(__name__)

ERROR_GAIN = 5.0
MIN_ACS_LINES = 10  # ESPIRiT (kernel 6) fails on fewer rows at small matrices; 256 px gets 10-20 anyway
BART_METHOD = "bart-pics"

__all__ = [
    "EvalSubject",
    "MethodResult",
    "find_subjects",
    "lesion_contrast",
    "load_subject",
    "montage",
    "run_evaluation",
    "summarise",
    "tune_weights",
    "undersample",
]

#: The data-consistency weight each diffusion method exposes to tuning, and where the card keeps it.
TUNABLE = {
    "dps": ("zeta", None, "zeta_per_acceleration"),
    "dps-fast": ("gamma", "dps_fast", "gamma_per_acceleration"),
    "dps-warm": ("gamma", "dps_warm", "gamma_per_acceleration"),
}


@dataclass
class EvalSubject:
    """A held-out subject: fully sampled scan, noiseless truth ``(S, H, W)``, optional label maps.

    ``coil_weight``: the simulator's ``||L^-1 S||`` (``data.coils.prewhitened_coil_weight``);
    :attr:`reference` is what the metrics compare with.
    """

    name: str
    scan: KSpaceScan
    truth: np.ndarray
    labels: dict[str, np.ndarray] | None
    coil_weight: np.ndarray | None = None

    @property
    def reference(self) -> np.ndarray:
        """The noiseless magnitude the prewhitened data determine: ``|truth| x coil_weight``
        (``|truth|`` for subjects written before the weight was saved)."""
        magnitude = np.abs(self.truth)
        return magnitude if self.coil_weight is None else magnitude * self.coil_weight


@dataclass
class MethodResult:
    """Numbers of one method on one subject at one R."""

    subject: str
    acceleration: int
    method: str
    nrmse: float
    psnr: float
    ssim: float
    seconds: float
    nfe: int | None = None
    lesion_contrast: float | None = None
    lesion_contrast_truth: float | None = None

    @property
    def lesion_contrast_error(self) -> float | None:
        if self.lesion_contrast is None or not self.lesion_contrast_truth:
            return None
        return abs(self.lesion_contrast - self.lesion_contrast_truth) / abs(self.lesion_contrast_truth)


def find_subjects(data_dir: str | Path, *, limit: int | None = None) -> list[Path]:
    """``DIR/sub-*/`` directories holding ``reference.h5`` and ``truth.npy``, sorted."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation data directory not found: {root}")
    subjects = [
        p
        for p in sorted(root.glob("sub-*"))
        if (p / "reference.h5").is_file() and (p / "truth.npy").is_file()
    ]
    if not subjects:
        raise ValueError(f"no simulated subjects (sub-*/reference.h5 + truth.npy) under {root}")
    return subjects[:limit] if limit else subjects


def _middle(n: int, keep: int | None) -> slice:
    if keep is None or keep >= n:
        return slice(0, n)
    start = (n - keep) // 2
    return slice(start, start + keep)


def load_subject(directory: str | Path, *, slices: int | None = None) -> EvalSubject:
    """Assemble ``reference.h5`` (fully sampled), read ``truth.npy`` and ``labels.npz`` if present.

    ``slices``: keep only that many central slices (faster evaluations).
    """
    from recon_server.mrd.assemble import Assembler
    from recon_server.mrd.ismrmrd_io import read_raw

    d = Path(directory)
    raw = read_raw(d / "reference.h5")
    asm = Assembler(raw.header_xml)
    for head, data in zip(raw.acquisition_headers, raw.data, strict=True):
        asm.add_line(head, data)
    scans = asm.finish()
    if len(scans) != 1 or not scans[0].mask.all():
        raise ValueError(f"{d}/reference.h5: expected one fully sampled scan, got {len(scans)}")
    scan = scans[0]
    truth = np.load(d / "truth.npy")
    image_shape = (scan.kspace.shape[0], *scan.kspace.shape[-2:])
    if truth.shape != image_shape:
        raise ValueError(f"{d}: truth {truth.shape} does not match the scan's images {image_shape}")
    weight = np.load(d / "coil_weight.npy") if (d / "coil_weight.npy").is_file() else None
    if weight is not None and weight.shape != truth.shape:
        raise ValueError(f"{d}: coil_weight {weight.shape} does not match the truth {truth.shape}")
    labels = None
    if (d / "labels.npz").is_file():
        with np.load(d / "labels.npz") as z:
            labels = {k: z[k] for k in z.files}
    keep = _middle(truth.shape[0], slices)
    scan = replace(
        scan,
        kspace=scan.kspace[keep],
        calibration=scan.calibration[keep],
        geometry=scan.geometry[keep],
    )
    if labels is not None:
        labels = {k: v[keep] for k, v in labels.items()}
    return EvalSubject(d.name, scan, truth[keep], labels, None if weight is None else weight[keep])


def undersample(full: KSpaceScan, acceleration: int) -> KSpaceScan:
    """Retrospective fastMRI equispaced undersampling at ``acceleration`` (module docstring, 1)."""
    ky, kx = full.kspace.shape[-2:]
    cf = default_center_fraction(acceleration)
    num_low = max(MIN_ACS_LINES, round(ky * cf))
    cf = num_low / ky
    lines = equispaced_mask(ky, acceleration, center_fraction=cf, offset=0)
    start = (ky - num_low + 1) // 2
    acs = (start, start + num_low)
    mask = mask_2d(lines, kx)
    kspace = (full.kspace * mask).astype(np.complex64)
    return replace(
        full,
        kspace=kspace,
        mask=mask,
        acs=acs,
        calibration=np.ascontiguousarray(full.kspace[..., acs[0] : acs[1], :]),
        acceleration=acceleration_of(lines),  # effective (ACS included), as the assembler reports it
    )


def lesion_contrast(magnitude: np.ndarray, labels: dict[str, np.ndarray] | None) -> float | None:
    """``(mean_lesion - mean_wm) / mean_wm`` (module docstring, 4); None without lesion or WM pixels."""
    if not labels or "LESION" not in labels or "WM" not in labels:
        return None
    lesion = labels["LESION"] > 0.5
    wm = (labels["WM"] > 0.9) & (labels["LESION"] < 0.05)
    if lesion.sum() < 3 or wm.sum() < 3:
        return None
    mag = np.abs(magnitude)
    mean_wm = float(mag[wm].mean())
    return (float(mag[lesion].mean()) - mean_wm) / mean_wm if mean_wm > 0 else None


def _score(
    subject: EvalSubject, accel: int, method: str, image: np.ndarray, seconds: float, nfe: int | None
) -> MethodResult:
    truth = subject.reference
    fitted = image * scale_fit(image, truth)
    return MethodResult(
        subject=subject.name,
        acceleration=accel,
        method=method,
        nrmse=quality.nrmse(image, truth, fit_scale=True),
        psnr=quality.psnr(image, truth, fit_scale=True),
        ssim=quality.ssim(image, truth, fit_scale=True),
        seconds=seconds,
        nfe=nfe,
        lesion_contrast=lesion_contrast(fitted, subject.labels),
        lesion_contrast_truth=lesion_contrast(truth, subject.labels),
    )


def scale_fit(image: np.ndarray, truth: np.ndarray) -> float:
    """The least-squares real scale ``a`` minimising ``||a image - truth||`` (1 for an empty image)."""
    den = float(np.sum(image.astype(np.float64) ** 2))
    return float(np.sum(image * truth)) / den if den > 0 else 1.0


def run_evaluation(
    data_dir: str | Path,
    *,
    accelerations: Sequence[int],
    methods: Sequence[str],
    out_dir: str | Path,
    subjects: int | None = None,
    slices: int | None = None,
    bart: bool = False,
    device: str = "cpu",
    diffusion: DiffusionSettings | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, object]:
    """Evaluate ``methods`` (+ BART pics) at each R on the subjects of ``data_dir``; write the outputs.

    ``diffusion``: the diffusion methods' settings (model, overrides, seed; None: defaults).
    ``progress(done, total, text)``: called after each case (subject x R x method), ``text`` like
    ``sub-000 R=4 dps-fast: NRMSE 0.0512 (3.2 s)``; None: the same text is logged at INFO.

    Returns the JSON document written to ``out_dir/results.json``.
    """
    from recon_server.recon.methods import get_method
    from recon_server.recon.pipeline import prewhitened, reconstruct_all

    for m in methods:
        get_method(m)
    if bart:
        from recon_server.research.bart import bart_binary, pics

        if bart_binary() is None:
            raise FileNotFoundError("--bart given but the bart binary is not installed (Debian package bart)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[MethodResult] = []
    montages: dict[int, dict[str, np.ndarray]] = {}
    paths = find_subjects(data_dir, limit=subjects)
    total = len(paths) * len(accelerations) * (len(methods) + int(bart))

    def report(subject: str, accel: int, method: str) -> None:
        r = results[-1]
        text = f"{subject} R={accel} {method}: NRMSE {r.nrmse:.4f} ({r.seconds:.1f} s)"
        if progress is not None:
            progress(len(results), total, text)
        else:
            log.info("case %d/%d: %s", len(results), total, text)

    for index, path in enumerate(paths):
        subject = load_subject(path, slices=slices)
        for accel in accelerations:
            scan = undersample(subject.scan, accel)
            images: dict[str, np.ndarray] = {}
            for method in methods:
                t0 = time.perf_counter()
                volume = reconstruct_all(scan, method=method, device=device, diffusion=diffusion)[0]
                seconds = time.perf_counter() - t0
                nfe = volume.provenance.settings.get("nfe_per_slice")
                images[method] = volume.magnitude
                results.append(
                    _score(
                        subject,
                        accel,
                        method,
                        volume.magnitude,
                        seconds,
                        nfe if isinstance(nfe, int) else None,
                    )
                )
                report(subject.name, accel, method)
            if bart:
                t0 = time.perf_counter()
                rows = scan.acs[1] - scan.acs[0]
                image = np.abs(pics(prewhitened(scan, "cpu")[0].numpy(), calibration_rows=rows))
                images[BART_METHOD] = image
                results.append(_score(subject, accel, BART_METHOD, image, time.perf_counter() - t0, None))
                report(subject.name, accel, BART_METHOD)
            if index == 0:
                montages[accel] = {"truth": subject.reference, **images}
    return _write_outputs(out, data_dir, accelerations, list(methods), slices, bart, results, montages)


def _write_outputs(
    out: Path,
    data_dir: str | Path,
    accelerations: Sequence[int],
    methods: list[str],
    slices: int | None,
    bart: bool,
    results: list[MethodResult],
    montages: dict[int, dict[str, np.ndarray]],
) -> dict[str, object]:
    """``results.json``, ``results.md`` and one montage per R in ``out``; returns the JSON document."""
    summary = summarise(results)
    doc: dict[str, object] = {
        "data": str(data_dir),
        "accelerations": list(accelerations),
        "methods": methods + ([BART_METHOD] if bart else []),
        "slices_per_subject": slices,
        "protocol": "reference.h5 retrospectively undersampled (fastMRI equispaced, offset 0); "
        "metrics on magnitude vs |truth| over the whole image, least-squares scale fit",
        "results": [{**r.__dict__, "lesion_contrast_error": r.lesion_contrast_error} for r in results],
        "summary": summary,
        "montage_columns": ["truth", *methods] + ([BART_METHOD] if bart else []),
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "results.md").write_text(markdown_table(summary) + "\n")
    for accel, imgs in montages.items():
        montage(imgs, out / f"montage_R{accel}.png")
    return doc


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: Sequence[MethodResult]) -> list[dict[str, object]]:
    """Mean and sd over subjects per (R, method), in the order first seen."""
    groups: dict[tuple[int, str], list[MethodResult]] = {}
    for r in results:
        groups.setdefault((r.acceleration, r.method), []).append(r)
    rows = []
    for (accel, method), rs in sorted(groups.items(), key=lambda kv: kv[0][0]):
        row: dict[str, object] = {"acceleration": accel, "method": method, "subjects": len(rs)}
        for key in ("nrmse", "psnr", "ssim", "seconds"):
            row[key] = _mean_sd([float(getattr(r, key)) for r in rs])
        errs = [e for e in (r.lesion_contrast_error for r in rs) if e is not None]
        row["lesion_contrast_error"] = _mean_sd(errs) if errs else None
        nfe = [r.nfe for r in rs if r.nfe is not None]
        row["nfe"] = nfe[0] if nfe else None
        rows.append(row)
    return rows


def markdown_table(summary: Sequence[dict[str, object]]) -> str:
    """The summary as a markdown table (mean +- sd over subjects)."""

    def pm(v: object, digits: int) -> str:
        if v is None:
            return "-"
        assert isinstance(v, tuple | list)
        mean, sd = float(v[0]), float(v[1])
        return f"{mean:.{digits}f} ± {sd:.{digits}f}"

    lines = [
        "| R | method | subjects | NRMSE | PSNR (dB) | SSIM | lesion contrast error | NFE | s/volume |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {row['acceleration']} | {row['method']} | {row['subjects']} | {pm(row['nrmse'], 4)} "
            f"| {pm(row['psnr'], 2)} | {pm(row['ssim'], 4)} | {pm(row['lesion_contrast_error'], 3)} "
            f"| {row['nfe'] if row['nfe'] is not None else '-'} | {pm(row['seconds'], 1)} |"
        )
    return "\n".join(lines)


def montage(images: dict[str, np.ndarray], path: Path) -> Path:
    """Middle slice: row 1 truth + methods (the truth's grey scale), row 2 5x |error| maps."""
    from recon_server.research.preview import magnitude_grid, write_png

    truth = images["truth"]
    mid = truth.shape[0] // 2
    t = truth[mid]
    tiles = [t] + [img[mid] * scale_fit(img[mid], t) for name, img in images.items() if name != "truth"]
    errors = [t] + [ERROR_GAIN * np.abs(tile - t) for tile in tiles[1:]]
    top = magnitude_grid(np.stack(tiles), columns=len(tiles), scale="shared")
    bottom = magnitude_grid(np.stack(errors), columns=len(tiles), scale="shared")
    return write_png(path, np.concatenate([top, bottom[2:]], axis=0))


def _tuned_only(section: dict, key: str) -> dict[str, float]:
    """The per-R table of a card section if it was tuned (placeholders are not kept)."""
    return dict(section.get(key, {})) if section.get("tuned") else {}


def tune_weights(
    model_dir: str | Path,
    data_dir: str | Path,
    *,
    method: str,
    accelerations: Sequence[int],
    weights: Sequence[float],
    subjects: int = 2,
    slices: int | None = 4,
    device: str = "cpu",
    write: bool = True,
    diffusion: DiffusionSettings | None = None,
) -> dict[str, object]:
    """Sweep the method's data-consistency weight per R; mean NRMSE over the validation subjects.

    ``dps``: zeta (card ``sampler_defaults.zeta_per_acceleration``, ``tuned``); ``dps-fast`` /
    ``dps-warm``: the CG weight gamma (``sampler_defaults.dps_fast.gamma_per_acceleration``...).
    With ``write`` the best weight per R goes into the card's table (R tuned by an earlier sweep and
    not in this one keep theirs; untuned placeholders are dropped)
    via :func:`recon_server.dpm.checkpoint.update_card_sampler_defaults`.
    """
    from recon_server.dpm.checkpoint import read_card, update_card_sampler_defaults
    from recon_server.recon.pipeline import reconstruct_all

    if method not in TUNABLE:
        raise ValueError(f"tune-zeta tunes {sorted(TUNABLE)}, got {method!r}")
    name, section, key = TUNABLE[method]
    settings = replace(diffusion or DiffusionSettings(), model_dir=Path(model_dir))
    loaded = [load_subject(p, slices=slices) for p in find_subjects(data_dir, limit=subjects)]
    base = dict(settings.overrides)
    grid: dict[str, dict[str, float]] = {}
    best: dict[str, float] = {}
    for accel in accelerations:
        scores: dict[str, float] = {}
        for w in weights:
            trial = replace(settings, overrides={**base, method: {**base.get(method, {}), name: float(w)}})
            values = []
            for subject in loaded:
                scan = undersample(subject.scan, accel)
                volume = reconstruct_all(scan, method=method, device=device, diffusion=trial)[0]
                values.append(quality.nrmse(volume.magnitude, subject.reference, fit_scale=True))
            scores[f"{w:g}"] = statistics.fmean(values)
            log.info("tune %s R=%d %s=%g: NRMSE %.4f", method, accel, name, w, scores[f"{w:g}"])
        grid[str(accel)] = scores
        best[str(accel)] = float(min(scores, key=lambda k: scores[k]))
    tuning = {
        "method": method,
        "weight": name,
        "data": str(data_dir),
        "subjects": [s.name for s in loaded],
        "slices_per_subject": slices,
        "metric": "mean NRMSE (magnitude, scale fit) over subjects",
        "grid": grid,
    }
    if write:
        defaults = dict(read_card(model_dir).sampler_defaults)
        # Accelerations tuned earlier and not in this sweep keep their weight (and their grid).
        old = dict(defaults if section is None else defaults.get(section, {}))
        table = {**_tuned_only(old, key), **best}
        merged = {**dict(old.get("tuning", {}).get("grid", {})), **grid} if old.get("tuned") else grid
        tuning = {**tuning, "grid": merged}
        if section is None:
            defaults.update({key: table, "tuned": True, "tuning": tuning})
            defaults.pop("note", None)
        else:
            defaults[section] = {**old, key: table, "tuned": True, "tuning": tuning}
        update_card_sampler_defaults(model_dir, defaults)
    return {"best": best, **tuning, "written": write}
