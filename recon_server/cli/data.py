"""Subcommands of the data area: ``simulate`` (brain simulator -> subject files) and ``prepare-data``.

The simulator imports torch: it is imported in the handlers, not here (``recon_server.cli.main``
builds its parser without torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from recon_server.cli import options
from recon_server.data.contrast import CONTRASTS

log = logging.getLogger(__name__)

#: ``recon_server.data.acquire.SUBJECT_FILES`` / ``DEFAULT_SUBJECT_FILES`` (that module imports
#: torch; a unit test keeps these equal).
SUBJECT_FILES = ("raw", "reference", "truth", "labels")
DEFAULT_SUBJECT_FILES = ("raw", "reference", "truth")


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
    fmt = options.HelpFormatter
    sim = subparsers.add_parser(
        "simulate", help="simulate brain MRI subjects (ISMRMRD raw + reference + truth)", formatter_class=fmt
    )
    sim.add_argument("--out", required=True, type=Path, help="output directory (sub-XXX/ folders)")
    sim.add_argument("--subjects", type=options.positive_int, default=1)
    sim.add_argument("--first-subject", type=int, default=0, help="index of the first subject (sharding)")
    sim.add_argument("--contrast", default="FLAIR", help=f"one of {', '.join(CONTRASTS)}")
    sim.add_argument("--lesions", action="store_true", help="add ischaemic stroke lesions")
    sim.add_argument(
        "--lesion-count", type=int, default=None, help="lesions per subject (default: drawn, 1-3)"
    )
    sim.add_argument("--accel", type=options.positive_int, default=4, help="acceleration of raw.h5")
    sim.add_argument(
        "--center-fraction",
        type=float,
        default=None,
        help="ACS fraction (default: fastMRI's for --accel, 0.08 up to R=4, 0.04 above)",
    )
    sim.add_argument(
        "--acs-calibration-only",
        action="store_true",
        help="flag ACS lines off the sampling grid as calibration-only (GRAPPA style)",
    )
    sim.add_argument("--matrix", type=int, default=256, help="even in-plane matrix")
    sim.add_argument("--coils", type=options.positive_int, default=16)
    sim.add_argument("--slices", type=options.positive_int, default=16)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--snr", type=float, default=None, help="white-matter SNR (default: drawn, 30-40)")
    sim.add_argument("--fov", type=float, default=240.0, help="field of view (mm)")
    sim.add_argument("--thickness", type=float, default=5.0, help="slice thickness (mm)")
    sim.add_argument("--oversampling", type=int, default=2, choices=(1, 2), help="readout oversampling")
    sim.add_argument("--tilt", type=float, default=0.0, help="oblique tilt about the readout axis (deg)")
    sim.add_argument("--tr", type=float, default=None, help="TR (ms; default: drawn per protocol)")
    sim.add_argument("--te", type=float, default=None, help="TE (ms; default: drawn per protocol)")
    sim.add_argument("--ti", type=float, default=None, help="TI (ms, FLAIR; default: nulls CSF)")
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
    prep.add_argument(
        "--size", type=int, default=None, help="crop/pad to size x size (default: the first scan's)"
    )
    prep.add_argument("--center-fraction", type=float, default=0.08, help="ACS fraction for maps and scale")
    prep.add_argument(
        "--contrast", default=None, help=f"contrast label when the files give none ({', '.join(CONTRASTS)})"
    )
    prep.set_defaults(func=run_prepare)


def _say(command: str, text: str) -> None:
    print(f"recon-server {command}: {text}", file=sys.stderr, flush=True)


def run_simulate(args: argparse.Namespace) -> int:
    """``recon-server simulate``: one ``sub-XXX/`` directory per subject; a progress line on
    stderr per subject, and a warning when ``--lesions`` left a slab without lesion voxels."""
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
    total = args.subjects
    started = time.perf_counter()
    for done, index in enumerate(range(args.first_subject, args.first_subject + total), start=1):
        start = time.perf_counter()
        subject = acquire.simulate_subject(config, seed=args.seed, index=index)
        acquire.write_subject(subject, args.out / subject.subject_id, files=args.files)
        seconds = time.perf_counter() - start
        _say(
            "simulate",
            f"subject {done}/{total}: {subject.subject_id} ({config.contrast}) in {seconds:.1f} s, "
            f"{time.perf_counter() - started:.1f} s elapsed",
        )
        if args.lesions and not subject.metadata.get("lesion_voxels"):
            lesions = subject.metadata.get("lesions")
            drawn = len(lesions) if isinstance(lesions, list) else 0
            _say(
                "simulate",
                f"warning: {subject.subject_id}: the slab holds no lesion voxels "
                f"({drawn} lesion(s) drawn, none inside the {config.slices} slices)",
            )
    if args.preview:
        path = write_preview(config, args.out / "preview.png", seed=args.seed, index=args.first_subject)
        _say("simulate", f"preview: {path}")
    return 0


def write_preview(config: object, path: Path, *, seed: int, index: int) -> Path:
    """PNG contact sheet: one slice of one subject in every contrast (columns), without and with
    lesions (rows), noiseless magnitude. The slice is the one where the lesions change the FLAIR
    image most, so a person sees them."""
    from recon_server.data import acquire
    from recon_server.research.preview import Panel, write_titled_sheet

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
    panels = [
        Panel(images[label, lesions][shown], f"{label}{' + lesions' if lesions else ''}")
        for lesions in (False, True)
        for label in CONTRASTS
    ]
    return write_titled_sheet(
        path,
        panels,
        columns=len(CONTRASTS),
        title=f"recon-server simulate: sub-{index:03d}, seed {seed}, slice {shown}",
    )


def run_prepare(args: argparse.Namespace) -> int:
    """``recon-server prepare-data``: slices.npy + index.json in ``--out``.

    The files are prepared in a hidden folder beside ``--out`` and renamed into it at the end:
    a failure (a bad input file, an interrupt) leaves ``--out`` as it was and no temporary file.
    """
    from recon_server.data import slices

    contrast = args.contrast.upper() if args.contrast else None
    if contrast is not None and contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {args.contrast!r}: expected one of {', '.join(CONTRASTS)}")
    if args.size is not None and (args.size < 8 or args.size % 2):
        raise ValueError(f"--size must be an even number >= 8, got {args.size}")
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        index = slices.prepare_dataset(
            slices.iter_scans(args.source, args.input, contrast=contrast),
            staging,
            size=args.size,
            center_fraction=args.center_fraction,
        )
        out.mkdir(exist_ok=True)
        for item in sorted(staging.iterdir()):
            item.replace(out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    records = index["slices"]
    assert isinstance(records, list)
    log.info("prepared %d slices in %.1f s -> %s", len(records), time.perf_counter() - start, out)
    return 0
