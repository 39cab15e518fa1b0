"""What training needs from a prepared slice set, and the deterministic global-batch sampler.

Protocol (:class:`SliceSet`): ``len(ds)``; ``ds[i] -> (x, contrast, subject)`` with ``x`` float32
``(2, H, W)`` (real, imaginary of a scale-normalised complex slice); ``ds.info(i) -> SliceInfo``
giving contrast and subject without loading the image (used to split subjects).

On-disk format: the one ``recon-server prepare-data`` writes (:mod:`recon_server.data.slices`)::

    DIR/slices.npy    complex64 (N, H, W), scale-normalised (ACS-image 99th percentile), memmapped
    DIR/index.json    {"slices": [{"contrast": "T1", "subject": "sub-0001", ...}, ...],  # N entries
                       "description": "optional free text copied into the model card", ...}

Only ``contrast`` and ``subject`` per entry are required here (prepare-data adds ``source``,
``slice``, ``scale`` and top-level ``version``, ``size``, ``scale_rule``, summarised in the card).
The trainer reads it with :class:`NpySliceSet` rather than ``data.slices.SliceDataset``, because
it needs the subject of each slice without loading it and no hidden random state (that
dataset's random flips would break the exact-resume and DDP-equivalence guarantees).

Random crops (:func:`crop_batch`, ``--crop N``): the offsets of the whole global batch come from a
generator seeded by ``(seed, step, 3)`` and each rank takes its share, so cropping keeps both
guarantees below (any world size sees the same crops; a resumed run continues identically).

Global batches (:func:`global_batch_positions`): the data stream is the concatenation of one
permutation per epoch (epoch ``e`` shuffled by a generator seeded from ``(seed, e)``); optimizer
step ``k`` consumes stream positions ``[k B, (k + 1) B)``, and rank ``r`` of ``W`` takes the
contiguous ``B / W`` block ``r`` of them. Any world size therefore sees the same global batches,
and a resumed run starts exactly where it stopped (the position is a function of the step).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from recon_server.dpm.unet import normalise_contrast

MAX_INDEX_BYTES = 256 * 1024 * 1024


class SliceInfo(NamedTuple):
    contrast: str
    subject: str


@runtime_checkable
class SliceSet(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]: ...

    def info(self, i: int) -> SliceInfo: ...


def _mix(*values: int) -> int:
    # Deterministic 63-bit seed from integers (splitmix-style), for per-epoch / per-step generators.
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def mix_seed(*values: int) -> int:
    """Public form of the seed mixer (training uses ``mix_seed(seed, step, stream_id)``)."""
    return _mix(*values)


class TensorSliceSet(Dataset):
    """In-memory set: ``images`` float32 (N, 2, H, W) or complex (N, H, W), with labels."""

    def __init__(
        self, images: torch.Tensor, contrasts: Sequence[str], subjects: Sequence[str], description: str = ""
    ) -> None:
        if images.is_complex():
            images = torch.view_as_real(images).permute(0, 3, 1, 2)
        if images.ndim != 4 or images.shape[1] != 2:
            raise ValueError(f"images must be (N, 2, H, W) or complex (N, H, W), got {tuple(images.shape)}")
        if not len(contrasts) == len(subjects) == images.shape[0]:
            raise ValueError("one contrast and one subject per image")
        self.images = images.float().contiguous()
        self.contrasts = [normalise_contrast(c) for c in contrasts]
        self.subjects = [str(s) for s in subjects]
        self.description = description

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        return self.images[i], self.contrasts[i], self.subjects[i]

    def info(self, i: int) -> SliceInfo:
        return SliceInfo(self.contrasts[i], self.subjects[i])


class NpySliceSet(Dataset):
    """The documented fallback format (``slices.npy`` + ``index.json``), memory-mapped."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        index_path, data_path = d / "index.json", d / "slices.npy"
        for p in (index_path, data_path):
            if not p.is_file():
                raise FileNotFoundError(f"training set {d}: missing {p.name}")
        if index_path.stat().st_size > MAX_INDEX_BYTES:
            raise ValueError(f"{index_path} is larger than {MAX_INDEX_BYTES} bytes")
        index = json.loads(index_path.read_text())
        entries = index.get("slices") if isinstance(index, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"{index_path}: expected an object with a 'slices' list")
        self.data_path = data_path
        self._data: np.ndarray | None = None
        data = self.data
        if data.ndim != 3 or not np.iscomplexobj(data):
            raise ValueError(f"{data_path}: expected complex (N, H, W), got {data.dtype} {data.shape}")
        if len(entries) != data.shape[0]:
            raise ValueError(f"{index_path} has {len(entries)} entries for {data.shape[0]} slices")
        try:
            self.contrasts = [normalise_contrast(e["contrast"]) for e in entries]
            self.subjects = [str(e["subject"]) for e in entries]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{index_path}: every slice needs 'contrast' and 'subject'") from exc
        self.description = str(index.get("description", "")) or _describe_index(index, self.contrasts)

    @property
    def data(self) -> np.ndarray:
        # Opened lazily per process: a memmap must not be pickled into data-loader workers
        # (pickling copies the whole array).
        if self._data is None:
            self._data = np.load(self.data_path, mmap_mode="r")
        return self._data

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_data"] = None
        return state

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        z = np.asarray(self.data[i], dtype=np.complex64)
        x = torch.from_numpy(np.stack([z.real, z.imag]).astype(np.float32))
        return x, self.contrasts[i], self.subjects[i]

    def info(self, i: int) -> SliceInfo:
        return SliceInfo(self.contrasts[i], self.subjects[i])


def _describe_index(index: dict[str, Any], contrasts: list[str]) -> str:
    # recon_server.data.slices (prepare-data) writes no free-text description: summarise its keys.
    sources = sorted({str(e.get("source", "?")) for e in index["slices"] if isinstance(e, dict)})
    parts = [f"prepared slices (index version {index.get('version', '?')})"]
    if "size" in index:
        parts.append(f"{index['size']}x{index['size']}")
    if "scale_rule" in index:
        parts.append(f"scale {index['scale_rule']}")
    parts.append(f"sources {','.join(sources)}; contrasts {','.join(sorted(set(contrasts)))}")
    return ", ".join(parts)


def write_npy_slice_set(
    directory: str | os.PathLike[str],
    images: np.ndarray,
    contrasts: Sequence[str],
    subjects: Sequence[str],
    description: str = "",
) -> Path:
    """Write the fallback format (complex64 (N, H, W) plus index); used by tests and converters."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "slices.npy", np.asarray(images, dtype=np.complex64))
    entries = [{"contrast": c, "subject": s} for c, s in zip(contrasts, subjects, strict=True)]
    (d / "index.json").write_text(json.dumps({"slices": entries, "description": description}))
    return d


class Subset(Dataset):
    """A view of a slice set restricted to ``indices``."""

    def __init__(self, base: SliceSet, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.description = str(getattr(base, "description", ""))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        return self.base[self.indices[i]]

    def info(self, i: int) -> SliceInfo:
        return self.base.info(self.indices[i])


class ConcatSlices(Dataset):
    """Concatenation of slice sets (joint training)."""

    def __init__(self, parts: Sequence[SliceSet]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.description = " + ".join(str(getattr(p, "description", "")) for p in self.parts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[SliceSet, int]:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k], i - int(self.offsets[k])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        part, j = self._locate(i)
        return part[j]

    def info(self, i: int) -> SliceInfo:
        part, j = self._locate(i)
        return part.info(j)


def open_training_set(path: str | os.PathLike[str]) -> SliceSet:
    """Open a prepared slice directory (``recon-server prepare-data ... --out DIR``)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"training data directory {p} does not exist")
    return NpySliceSet(p)


def subjects_by_contrast(ds: SliceSet) -> dict[str, dict[str, list[int]]]:
    """``{contrast: {subject: [slice indices]}}`` in index order."""
    out: dict[str, dict[str, list[int]]] = {}
    for i in range(len(ds)):
        c, s = ds.info(i)
        out.setdefault(c, {}).setdefault(s, []).append(i)
    return out


@dataclass(frozen=True)
class SubjectSplit:
    """Training and held-out subjects of one contrast, chosen deterministically."""

    contrast: str
    train_subjects: list[str]
    val_subjects: list[str]
    train_indices: list[int]
    val_indices: list[int]


def split_subjects(
    ds: SliceSet, contrast: str, *, n_val: int, max_train: int | None = None, split_seed: int = 0
) -> SubjectSplit:
    """Hold out ``n_val`` subjects of ``contrast``; train on (at most ``max_train`` of) the rest.

    Subjects are sorted by id and shuffled with ``split_seed`` (fixed, independent of the training
    seed), so every run on the same data holds out the same subjects; the held-out ones come first.
    """
    key = normalise_contrast(contrast)
    table = subjects_by_contrast(ds)
    if key not in table:
        raise ValueError(f"contrast {key!r} not in the training set (has {sorted(table)})")
    subjects = sorted(table[key])
    order = torch.randperm(len(subjects), generator=torch.Generator().manual_seed(split_seed)).tolist()
    subjects = [subjects[i] for i in order]
    if n_val < 0 or n_val >= len(subjects):
        raise ValueError(f"cannot hold out {n_val} of the {len(subjects)} {key} subjects")
    val, train = subjects[:n_val], subjects[n_val:]
    if max_train is not None:
        train = train[:max_train]
    return SubjectSplit(
        contrast=key,
        train_subjects=train,
        val_subjects=val,
        train_indices=[i for s in train for i in table[key][s]],
        val_indices=[i for s in val for i in table[key][s]],
    )


def global_batch_positions(step: int, *, n: int, global_batch: int, seed: int) -> list[int]:
    """Dataset indices of the global batch of optimizer step ``step`` (see module docstring)."""
    start = step * global_batch
    out: list[int] = []
    epoch, perm = -1, torch.empty(0, dtype=torch.long)
    for pos in range(start, start + global_batch):
        e = pos // n
        if e != epoch:
            epoch = e
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, e)))
        out.append(int(perm[pos % n]))
    return out


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of the global batches for steps ``start_step .. total_steps - 1``."""

    def __init__(
        self,
        n: int,
        *,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        start_step: int,
        total_steps: int,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        if n < 1:
            raise ValueError("empty training set")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world_size
        self.seed, self.start, self.total = seed, start_step, total_steps

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        local = self.global_batch // self.world
        for step in range(self.start, self.total):
            batch = global_batch_positions(step, n=self.n, global_batch=self.global_batch, seed=self.seed)
            yield batch[self.rank * local : (self.rank + 1) * local]


def crop_offsets(
    step: int, *, global_batch: int, size: tuple[int, int], crop: int, seed: int
) -> torch.Tensor:
    """Top-left corners ``(global_batch, 2)`` of the random ``crop x crop`` windows of step ``step``.

    Uniform over the valid corners of an ``size = (H, W)`` image, from a CPU generator seeded by
    ``mix_seed(seed, step, 3)``: a function of the step alone (the same for every rank).
    """
    h, w = size
    if not 1 <= crop <= min(h, w):
        raise ValueError(f"crop {crop} must be between 1 and the image size {h}x{w}")
    gen = torch.Generator().manual_seed(_mix(seed, step, 3))
    rows = torch.randint(0, h - crop + 1, (global_batch,), generator=gen)
    cols = torch.randint(0, w - crop + 1, (global_batch,), generator=gen)
    return torch.stack([rows, cols], dim=1)


def crop_batch(x: torch.Tensor, offsets: torch.Tensor, crop: int) -> torch.Tensor:
    """``x[b, :, r:r+crop, c:c+crop]`` for each item ``b`` with ``offsets[b] = (r, c)``."""
    if offsets.shape != (x.shape[0], 2):
        raise ValueError(f"offsets must be ({x.shape[0]}, 2), got {tuple(offsets.shape)}")
    return torch.stack([x[b, :, r : r + crop, c : c + crop] for b, (r, c) in enumerate(offsets.tolist())])
