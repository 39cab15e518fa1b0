"""Training slices: coil-combined, normalised complex images with contrast labels and subject ids.

Per scan (fully sampled k-space ``y``, ``(slices, coils, ky, kx)``, readout oversampling removed):

1. ACS block: the central ``round(ky * center_fraction)`` rows starting at
   ``(ky - n + 1) // 2`` (fastMRI's rule; ``center_fraction`` 0.08 by default, R = 4).
2. ESPIRiT maps ``S`` from that block (:func:`recon_server.recon.coils.espirit_maps`).
3. Image ``x = S^H F^H y`` (sum over coils of ``conj(S_c) ifft2c(y_c)``).
4. Scale convention (:func:`recon_server.recon.scale.slice_scale`, shared with the reconstruction):
   divide each slice by
   the 99th percentile of ``|S^H F^H y_acs|``, the coil-combined image of the ACS rows alone
   (zero elsewhere). The reconstruction applies the same function to its own ACS data.
5. Centre crop / zero pad in image space to ``size x size``.

Storage (``prepare-data --out DIR``)::

    DIR/slices.npy   complex64 (N, size, size), opened with mmap for random access
    DIR/index.json   {"version", "size", "center_fraction", "scale_rule", "slices": [
                       {"subject", "contrast", "source", "slice", "scale"} ...]}

:class:`SliceDataset` reads them: ``(x, label)`` with ``x`` float32 ``(2, H, W)`` (real, imag)
and ``label`` the index of the slice's contrast in the model's contrast slots; random flips
as augmentation; subject-level train / validation split, deterministic by seed.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recon_server.data import fastmri
from recon_server.data.contrast import CONTRASTS
from recon_server.mrd.ismrmrd_io import read_raw
from recon_server.recon.coils import calibration_region, espirit_maps
from recon_server.recon.fft import ifft2c
from recon_server.recon.scale import DEFAULT_CENTER_FRACTION, SCALE_QUANTILE, centre_acs, slice_scale

log = logging.getLogger(__name__)

SOURCES = ("simulated", "fastmri", "ismrmrd")
INDEX_VERSION = 1


def combine(
    kspace: np.ndarray | Tensor, *, center_fraction: float = DEFAULT_CENTER_FRACTION
) -> tuple[Tensor, Tensor]:
    """Normalised coil-combined images ``(slices, ky, kx)`` complex64 and their scales ``(slices,)``.

    ``kspace``: fully sampled ``(slices, coils, ky, kx)``, no readout oversampling.
    """
    k = torch.as_tensor(kspace).to(torch.complex64)
    if k.ndim != 4:
        raise ValueError(f"kspace must be (slices, coils, ky, kx), got shape {tuple(k.shape)}")
    acs = centre_acs(k.shape[-2], center_fraction)
    calib = calibration_region(k, acs, max_cols=k.shape[-1])
    maps = espirit_maps(calib, (k.shape[-2], k.shape[-1]))
    images = (maps.conj() * ifft2c(k)).sum(dim=1)
    scale = slice_scale(k[:, :, acs[0] : acs[1], :], maps, acs=acs)
    return images / scale[:, None, None], scale


def crop_or_pad(images: Tensor, size: int) -> Tensor:
    """Centre crop or zero pad the last two axes to ``size x size`` (image space)."""
    out = images
    for axis in (-2, -1):
        n = out.shape[axis]
        if n > size:
            start = (n - size) // 2
            out = out.narrow(axis, start, size)
        elif n < size:
            before = (size - n) // 2
            pad = [0, 0, 0, 0]
            pad[(0 if axis == -1 else 2)] = before
            pad[(1 if axis == -1 else 3)] = size - n - before
            out = torch.nn.functional.pad(out, pad)
    return out


@dataclass
class ScanInput:
    """One fully sampled scan to prepare: project-order k-space without readout oversampling."""

    subject: str
    contrast: str
    source: str
    kspace: np.ndarray


def _ismrmrd_scans(path: Path, subject: str, contrast: str | None) -> Iterator[ScanInput]:
    from recon_server.mrd.assemble import Assembler  # the service's assembler owns the ISMRMRD rules

    raw = read_raw(path)
    asm = Assembler(raw.header_xml)
    for head, data in zip(raw.acquisition_headers, raw.data, strict=True):
        asm.add_line(head, data)
    for scan in asm.finish():
        if not scan.mask.all():
            raise ValueError(
                f"{path}: prepare-data needs fully sampled k-space (R = {scan.acceleration:.2f})"
            )
        label = contrast or scan.contrast
        if not label:
            raise ValueError(f"{path}: contrast unknown from the header; pass --contrast")
        yield ScanInput(subject, label, str(path), scan.kspace)


def _fastmri_scan(path: Path, contrast: str | None) -> ScanInput:
    from recon_server.mrd.encoding import parse_header
    from recon_server.mrd.oversampling import remove_readout_oversampling

    scan = fastmri.read_fastmri(path)
    label = contrast or scan.contrast
    if not label:
        raise ValueError(f"{path}: unknown fastMRI acquisition {scan.acquisition!r}; pass --contrast")
    kspace = scan.kspace
    if scan.header_xml:
        nx = int(parse_header(scan.header_xml).encoding[0].reconSpace.matrixSize.x)
        kspace = remove_readout_oversampling(kspace, nx)
    return ScanInput(path.stem, label, str(path), kspace)


def _files(root: Path, pattern: str) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"input not found: {root}")
    files = sorted(root.glob(pattern))
    if not files:
        raise ValueError(f"no input files matching {pattern!r} under {root}")
    return files


def iter_scans(source: str, root: str | Path, *, contrast: str | None = None) -> Iterator[ScanInput]:
    """Fully sampled scans of ``source`` under ``root`` (a directory, or one file).

    simulated: ``root/sub-*/reference.h5`` (subject id ``<root name>/<sub-XXX>``);
    fastmri: ``*.h5`` (subject id = file stem); ismrmrd: ``*.h5`` fully sampled raw files.
    """
    root = Path(root)
    if source == "simulated":
        for ref in _files(root, "sub-*/reference.h5"):
            yield from _ismrmrd_scans(ref, f"{ref.parent.parent.name}/{ref.parent.name}", contrast)
    elif source == "fastmri":
        for path in _files(root, "*.h5"):
            yield _fastmri_scan(path, contrast)
    elif source == "ismrmrd":
        for path in _files(root, "*.h5"):
            yield from _ismrmrd_scans(path, path.stem, contrast)
    else:
        raise ValueError(f"unknown source {source!r}: expected one of {', '.join(SOURCES)}")


def prepare_dataset(
    scans: Sequence[ScanInput] | Iterator[ScanInput],
    out: str | Path,
    *,
    size: int | None = None,
    center_fraction: float = DEFAULT_CENTER_FRACTION,
) -> dict[str, object]:
    """Combine, normalise and store scans in ``out`` (see the module docstring); returns the index.

    ``size`` None takes the first scan's ``ky``. Slices are written to a temporary raw file as
    they come and turned into ``slices.npy`` at the end (one scan in memory at a time).
    """
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "slices.raw.tmp"
    records: list[dict[str, object]] = []
    with tmp.open("wb") as handle:
        for scan in scans:
            images, scales = combine(scan.kspace, center_fraction=center_fraction)
            size = size or int(images.shape[-2])
            images = crop_or_pad(images, size)
            handle.write(images.numpy().astype(np.complex64).tobytes())
            for k, sc in enumerate(scales.tolist()):
                records.append(
                    {
                        "subject": scan.subject,
                        "contrast": scan.contrast,
                        "source": scan.source,
                        "slice": k,
                        "scale": sc,
                    }
                )
            log.info("prepared %s (%s): %d slices", scan.subject, scan.contrast, len(scales))
    if not records or size is None:
        tmp.unlink(missing_ok=True)
        raise ValueError("no slices prepared: the input held no scans")
    # Stream the raw slices behind a .npy header (no second copy in memory).
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.complex64)), "fortran_order": False}
    with (out_dir / "slices.npy").open("wb") as dst, tmp.open("rb") as src:
        np.lib.format.write_array_header_2_0(dst, {**header, "shape": (len(records), size, size)})
        shutil.copyfileobj(src, dst, length=1 << 24)
    tmp.unlink()
    index = {
        "version": INDEX_VERSION,
        "size": size,
        "center_fraction": center_fraction,
        "scale_rule": f"slice / quantile_{SCALE_QUANTILE}(|S^H F^H y_acs|)",
        "slices": records,
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def split_subjects(subjects: Sequence[str], *, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Subject-level split: ``(train, val)`` sorted subject ids, deterministic for ``seed``.

    ``ceil(n * val_fraction)`` subjects (at least 1 when ``val_fraction > 0`` and ``n >= 2``)
    go to validation.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    unique = sorted(set(subjects))
    n_val = int(np.ceil(len(unique) * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0 and len(unique) >= 2:
        n_val = min(max(n_val, 1), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    val = sorted(unique[i] for i in order[:n_val])
    return sorted(set(unique) - set(val)), val


class SliceDataset(torch.utils.data.Dataset):
    """Prepared slices as ``(x, label)``: ``x`` float32 ``(2, H, W)``, ``label`` the contrast slot.

    ``split``: "train", "val" or "all" (subject-level split by :func:`split_subjects`).
    ``contrasts``: the model's contrast slots (label order); a slice whose contrast has no slot
    raises ValueError. ``augment`` (default: on for "train") flips rows and/or columns at random
    using ``generator``.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        split: str = "train",
        val_fraction: float = 0.1,
        seed: int = 0,
        contrasts: Sequence[str] = CONTRASTS,
        augment: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        root = Path(root)
        index = json.loads((root / "index.json").read_text())
        if index.get("version") != INDEX_VERSION:
            raise ValueError(f"{root}: unsupported index version {index.get('version')}")
        self.slices = np.load(root / "slices.npy", mmap_mode="r")
        records = index["slices"]
        if len(records) != self.slices.shape[0]:
            raise ValueError(
                f"{root}: index lists {len(records)} slices, slices.npy holds {self.slices.shape[0]}"
            )
        self.contrasts = list(contrasts)
        unknown = sorted({r["contrast"] for r in records} - set(self.contrasts))
        if unknown:
            raise ValueError(f"{root}: contrasts {unknown} have no slot in {self.contrasts}")
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        train, val = split_subjects([r["subject"] for r in records], val_fraction=val_fraction, seed=seed)
        keep = set(train) if split == "train" else set(val) if split == "val" else set(train) | set(val)
        self.rows = [i for i, r in enumerate(records) if r["subject"] in keep]
        self.labels = [self.contrasts.index(records[i]["contrast"]) for i in self.rows]
        self.subjects = sorted({records[i]["subject"] for i in self.rows})
        self.augment = split == "train" if augment is None else augment
        self.generator = generator

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = torch.from_numpy(np.array(self.slices[self.rows[i]]))
        if self.augment:
            flips = torch.randint(0, 2, (2,), generator=self.generator)
            dims = [d for d, f in zip((-2, -1), flips.tolist(), strict=True) if f]
            if dims:
                image = image.flip(dims)
        return torch.view_as_real(image).permute(2, 0, 1).contiguous(), self.labels[i]
