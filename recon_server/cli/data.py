"""Subcommands of the data area: ``simulate`` (brain simulator -> subject files) and ``prepare-data``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from recon_server.cli import options
from recon_server.data.acquire import DEFAULT_SUBJECT_FILES, SUBJECT_FILES
from recon_server.data.contrast import CONTRASTS

log = logging.getLogger(__name__)


def _files(text: str) -> tuple[str, ...]:
    names = tuple(sorted({t.strip() for t in text.split(",") if t.strip()}))
    bad = [n for n in names if n not in SUBJECT_FILES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"--files takes a comma list of {', '.join(SUBJECT_FILES)}, got {text!r}"
        )
    return names


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``recon-server`` parser."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    sim = subparsers.add_parser(
        "simulate", help="simulate brain MRI subjects (ISMRMRD raw + reference + truth)", formatter_class=fmt
    )
    sim.add_argument("--out", required=True, type=Path, help="output directory (sub-XXX/ folders)")
    sim.add_argument("--subjects", type=options.positive_int, default=1)
    sim.add_argument("--first-subject", type=int, default=0, help="index of the first subject (sharding)")
    sim.add_argument("--contrast", default="FLAIR", help=f"one of {', '.join(CONTRASTS)}")
    sim.add_argument("--lesions", action="store_true", help="add ischaemic stroke lesions")
    sim.add_argument("--lesion-count", type=int, default=None, help="lesions per subject (default 1-3)")
    sim.add_argument("--accel", type=options.positive_int, default=4, help="acceleration of raw.h5")
    sim.add_argument("--center-fraction", type=float, default=None, help="ACS fraction (fastMRI default)")
    sim.add_argument(
        "--acs-calibration-only",
        action="store_true",
        help="flag ACS lines off the sampling grid as calibration-only (GRAPPA style)",
    )
    sim.add_argument("--matrix", type=int, default=256, help="even in-plane matrix")
    sim.add_argument("--coils", type=options.positive_int, default=16)
    sim.add_argument("--slices", type=options.positive_int, default=16)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--snr", type=float, default=None, help="white-matter SNR (default drawn 30-40)")
    sim.add_argument("--fov", type=float, default=240.0, help="field of view (mm)")
    sim.add_argument("--thickness", type=float, default=5.0, help="slice thickness (mm)")
    sim.add_argument("--oversampling", type=int, default=2, choices=(1, 2), help="readout oversampling")
    sim.add_argument("--tilt", type=float, default=0.0, help="oblique tilt about the readout axis (deg)")
    sim.add_argument("--tr", type=float, default=None, help="TR (ms), overrides the protocol draw")
    sim.add_argument("--te", type=float, default=None, help="TE (ms)")
    sim.add_argument("--ti", type=float, default=None, help="TI (ms, FLAIR; default nulls CSF)")
    sim.add_argument(
        "--files",
        type=_files,
        default=DEFAULT_SUBJECT_FILES,
        help=f"which of {','.join(SUBJECT_FILES)} to write (labels: tissue maps for evaluation)",
    )
    sim.add_argument("--preview", action="store_true", help="write preview.png (all contrasts, +-lesion)")
    sim.set_defaults(func=run_simulate)

    prep = subparsers.add_parser(
        "prepare-data", help="build normalised coil-combined training slices", formatter_class=fmt
    )
    prep.add_argument("--source", required=True, choices=("simulated", "fastmri", "ismrmrd"))
    prep.add_argument("input", type=Path, help="input directory (or one file)")
    prep.add_argument("--out", required=True, type=Path, help="output directory (slices.npy, index.json)")
    prep.add_argument("--size", type=int, default=None, help="crop/pad to size x size (default: first scan)")
    prep.add_argument("--center-fraction", type=float, default=0.08, help="ACS fraction for maps and scale")
    prep.add_argument("--contrast", default=None, help="contrast label when the files do not give one")
    prep.set_defaults(func=run_prepare)


def run_simulate(args: argparse.Namespace) -> int:
    """``recon-server simulate``: one ``sub-XXX/`` directory per subject."""
    from recon_server.data import acquire

    config = acquire.SimulationConfig(
        contrast=args.contrast,
        matrix=args.matrix,
        slices=args.slices,
        coils=args.coils,
        acceleration=args.accel,
        lesions=args.lesions,
        lesion_count=args.lesion_count,
        snr=args.snr,
        fov_mm=args.fov,
        slice_thickness_mm=args.thickness,
        readout_oversampling=args.oversampling,
        tilt_deg=args.tilt,
        center_fraction=args.center_fraction,
        tr=args.tr,
        te=args.te,
        ti=args.ti,
        acs_calibration_only=args.acs_calibration_only,
    )
    if args.first_subject < 0:
        raise ValueError(f"--first-subject must be >= 0, got {args.first_subject}")
    args.out.mkdir(parents=True, exist_ok=True)
    for index in range(args.first_subject, args.first_subject + args.subjects):
        start = time.perf_counter()
        subject = acquire.simulate_subject(config, seed=args.seed, index=index)
        acquire.write_subject(subject, args.out / subject.subject_id, files=args.files)
        log.info("%s: %s in %.1f s", subject.subject_id, config.contrast, time.perf_counter() - start)
    if args.preview:
        path = write_preview(config, args.out / "preview.png", seed=args.seed, index=args.first_subject)
        log.info("preview: %s", path)
    return 0


def write_preview(config: object, path: Path, *, seed: int, index: int) -> Path:
    """PNG contact sheet: one slice of one subject in every contrast (columns), without and with
    lesions (rows), noiseless magnitude. The slice is the one where the lesions change the FLAIR
    image most, so a person sees them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recon_server.data import acquire

    assert isinstance(config, acquire.SimulationConfig)
    images: dict[tuple[str, bool], np.ndarray] = {}
    for label in CONTRASTS:
        for lesions in (False, True):
            cfg = dataclasses.replace(
                config, contrast=label, lesions=lesions, coils=1, tr=None, te=None, ti=None, snr=None
            )
            images[label, lesions] = np.abs(acquire.simulate_subject(cfg, seed=seed, index=index).truth)
    change = np.abs(images["FLAIR", True] - images["FLAIR", False]).sum(axis=(1, 2))
    shown = int(np.argmax(change)) if change.max() > 0 else config.slices // 2
    fig, axes = plt.subplots(2, len(CONTRASTS), figsize=(3 * len(CONTRASTS), 6.4), facecolor="black")
    for col, label in enumerate(CONTRASTS):
        for row, lesions in enumerate((False, True)):
            image = images[label, lesions][shown]
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=0, vmax=float(np.percentile(image, 99.5)))
            ax.set_title(f"{label}{' + lesions' if lesions else ''}", color="white", fontsize=10)
            ax.axis("off")
    fig.suptitle(f"recon-server simulate: sub-{index:03d}, seed {seed}, slice {shown}", color="white")
    fig.tight_layout()
    fig.savefig(path, dpi=80, facecolor="black", metadata={"Software": "recon-server"})
    plt.close(fig)
    return path


def run_prepare(args: argparse.Namespace) -> int:
    """``recon-server prepare-data``: slices.npy + index.json in ``--out``."""
    from recon_server.data import slices

    contrast = args.contrast.upper() if args.contrast else None
    if contrast is not None and contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {args.contrast!r}: expected one of {', '.join(CONTRASTS)}")
    if args.size is not None and (args.size < 8 or args.size % 2):
        raise ValueError(f"--size must be an even number >= 8, got {args.size}")
    start = time.perf_counter()
    index = slices.prepare_dataset(
        slices.iter_scans(args.source, args.input, contrast=contrast),
        args.out,
        size=args.size,
        center_fraction=args.center_fraction,
    )
    records = index["slices"]
    assert isinstance(records, list)
    log.info("prepared %d slices in %.1f s -> %s", len(records), time.perf_counter() - start, args.out)
    return 0
