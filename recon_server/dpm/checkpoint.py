"""Checkpoints: safetensors weights (state_dict only, never pickles) plus a JSON model card.

Layout of a served checkpoint directory::

    DIR/card.json                               the model card (below)
    DIR/model.safetensors                       all weights, when they fit in one shard, or
    DIR/model-00001-of-0000K.safetensors ...    shards of at most ``shard_bytes`` (16 MiB) each
    DIR/model.safetensors.index.json            {"weight_map": {tensor name: shard file}}

``card.json`` keys: ``format_version``, ``name``, ``version``, ``architecture`` (the
:class:`~recon_server.dpm.architecture.UNetConfig` as a dict), ``num_parameters``, ``contrast_slots``
(ordered names; slot ``i`` is one-hot entry ``i``), ``training`` (data description, subject
counts, steps, epochs, learning rates and schedule, EMA, hardware, wall time, parent card),
``validation`` (denoising numbers), ``sampler_defaults`` (steps, sigma range, rho, and zeta per
acceleration: placeholders with ``"tuned": false`` until the reconstruction tuning fills them),
``weights`` (``{"format": "safetensors", "dtype", "files": {file: sha256}, "index"}``).

Loading verifies, before any tensor reaches the model: every listed file exists and matches its
sha256; the architecture parses; the slot count matches the architecture; tensor names, shapes and
dtypes match the network the card describes; the parameter count matches.

The training state of a run (for resume) lives in ``RUN/train_state/`` and uses the same rules:
``model``/``ema``/``optimizer`` safetensors plus ``state.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from recon_server.dpm.architecture import UNetConfig
from recon_server.dpm.edm import DEFAULT_RHO, DEFAULT_SIGMA_MAX, DEFAULT_SIGMA_MIN
from recon_server.dpm.unet import EDMDenoiser, count_parameters

FORMAT_VERSION = 1
CARD_FILE = "card.json"
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 16 * 1024 * 1024
MAX_CARD_BYTES = 4 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint directory is missing, malformed, or its card does not match its weights."""


def default_sampler_defaults() -> dict[str, Any]:
    """Sampler settings stored in a new card; the zeta values are placeholders until tuned."""
    return {
        "prior": {"solver": "heun", "steps": 32},
        "dps": {
            "steps": 500,
            "sigma_min": DEFAULT_SIGMA_MIN,
            "sigma_max": DEFAULT_SIGMA_MAX,
            "rho": DEFAULT_RHO,
        },
        "zeta_per_acceleration": {"2": 1.0, "4": 1.0, "6": 1.0, "8": 1.0},
        "tuned": False,
        "note": "placeholders: zeta per acceleration is filled by the reconstruction tuning step",
    }


@dataclass
class ModelCard:
    """The JSON card that travels with the weights (see module docstring for the keys)."""

    name: str
    architecture: dict[str, Any]
    num_parameters: int
    contrast_slots: list[str]
    version: str = "0.1.0"
    training: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    sampler_defaults: dict[str, Any] = field(default_factory=default_sampler_defaults)
    weights: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelCard:
        required = ("name", "architecture", "num_parameters", "contrast_slots", "weights")
        missing = [k for k in required if k not in d]
        if missing:
            raise CheckpointError(f"model card lacks {missing}")
        if d.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise CheckpointError(f"card format_version {d.get('format_version')} != {FORMAT_VERSION}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def config(self) -> UNetConfig:
        try:
            return UNetConfig.from_dict(self.architecture)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"card architecture is invalid: {exc}") from exc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def write_tensors(
    directory: Path, stem: str, tensors: Mapping[str, torch.Tensor], *, shard_bytes: int
) -> dict:
    """Write ``tensors`` as ``stem.safetensors`` or shards + index; returns ``{"files", "index"}``."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    names = (
        [f"{stem}.safetensors"]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    files = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        files[name] = sha256_file(directory / name)
    index = None
    if len(shards) > 1:
        index = f"{stem}.safetensors.index.json"
        weight_map = {k: n for n, s in zip(names, shards, strict=True) for k in s}
        (directory / index).write_text(json.dumps({"weight_map": weight_map}, indent=1))
    return {"files": files, "index": index}


def read_tensors(
    directory: Path, files: Mapping[str, str], *, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Load the listed safetensors files after checking each one's sha256."""
    out: dict[str, torch.Tensor] = {}
    for name, digest in files.items():
        if Path(name).name != name:
            raise CheckpointError(f"weight file name {name!r} must not contain a path")
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"weight file {path} listed in the card is missing")
        if verify and sha256_file(path) != digest:
            raise CheckpointError(f"sha256 of {path} does not match the card (file changed or corrupt)")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key in out:
                    raise CheckpointError(f"tensor {key!r} appears in more than one weight file")
                out[key] = f.get_tensor(key)
    return out


def _replace_dir(tmp: Path, final: Path) -> None:
    # Swap a fully written temporary directory into place so a crash never leaves half a checkpoint.
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(
    model: EDMDenoiser,
    directory: str | os.PathLike[str],
    *,
    name: str,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    training: dict[str, Any] | None = None,
    validation: dict[str, Any] | None = None,
    sampler_defaults: dict[str, Any] | None = None,
    notes: str = "",
    version: str = "0.1.0",
    shard_bytes: int = SHARD_BYTES,
) -> ModelCard:
    """Write ``model`` (or ``state_dict``, e.g. the EMA weights, for its architecture) and its card."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = _cpu_state(state_dict if state_dict is not None else model.state_dict())
    weights = write_tensors(tmp, "model", state, shard_bytes=shard_bytes)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    card = ModelCard(
        name=name,
        version=version,
        architecture=model.config.to_dict(),
        num_parameters=count_parameters(model),
        contrast_slots=list(model.contrast_slots),
        training=training or {},
        validation=validation or {},
        sampler_defaults=sampler_defaults or default_sampler_defaults(),
        weights={"format": "safetensors", "dtype": ",".join(dtypes), **weights},
        notes=notes,
    )
    (tmp / CARD_FILE).write_text(card.to_json())
    _replace_dir(tmp, final)
    return card


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory, or a training run directory (its ``best/``, else ``last/``)."""
    p = Path(path)
    if (p / CARD_FILE).is_file():
        return p
    for sub in ("best", "last"):
        if (p / sub / CARD_FILE).is_file():
            return p / sub
    raise CheckpointError(f"no model card ({CARD_FILE}) in {p} nor in {p}/best or {p}/last")


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """Parse the card of a checkpoint (or run) directory."""
    card_path = resolve_checkpoint(path) / CARD_FILE
    if card_path.stat().st_size > MAX_CARD_BYTES:
        raise CheckpointError(f"{card_path} is larger than {MAX_CARD_BYTES} bytes")
    try:
        data = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{card_path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{card_path} must hold a JSON object")
    return ModelCard.from_dict(data)


def update_card_sampler_defaults(
    path: str | os.PathLike[str], sampler_defaults: Mapping[str, Any]
) -> ModelCard:
    """Replace the card's ``sampler_defaults`` (e.g. tuned zeta per acceleration), atomically.

    Only ``card.json`` changes; the weights and their sha256 entries stay as they are, so
    :func:`load_checkpoint` keeps verifying the checkpoint. Returns the new card.
    """
    directory = resolve_checkpoint(path)
    card = read_card(directory)
    card.sampler_defaults = json.loads(json.dumps(dict(sampler_defaults)))  # JSON-able, deep copy
    tmp = directory / (CARD_FILE + ".tmp")
    tmp.write_text(card.to_json())
    tmp.replace(directory / CARD_FILE)
    return card


def check_state_matches(model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Raise CheckpointError naming missing/unexpected tensors and shape or dtype mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: card says {tuple(expected[k].shape)} {expected[k].dtype}, file has {tuple(state[k].shape)} "
        f"{state[k].dtype}"
        for k in sorted(set(expected) & set(state))
        if expected[k].shape != state[k].shape or expected[k].dtype != state[k].dtype
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("shape/dtype mismatch: " + "; ".join(wrong[:5]))
        raise CheckpointError(f"{what}: weights do not match the card's architecture: " + ", ".join(parts))


def load_checkpoint(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[EDMDenoiser, ModelCard]:
    """Load and verify a checkpoint; returns ``(model in eval mode, card)``."""
    directory = resolve_checkpoint(path)
    card = read_card(directory)
    config = card.config()
    if len(card.contrast_slots) != config.num_slots:
        raise CheckpointError(
            f"{directory}: card lists {len(card.contrast_slots)} contrast slots {card.contrast_slots} "
            f"but the architecture has num_slots={config.num_slots}"
        )
    files = card.weights.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{directory}: card lists no weight files")
    state = read_tensors(directory, files)
    with torch.device("meta"):
        skeleton = EDMDenoiser(config, card.contrast_slots)
    check_state_matches(skeleton, state, what=str(directory))
    if count_parameters(skeleton) != card.num_parameters:
        raise CheckpointError(
            f"{directory}: card says {card.num_parameters} parameters, architecture has "
            f"{count_parameters(skeleton)}"
        )
    model = EDMDenoiser(config, card.contrast_slots)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), card


# --- training state (resume) -------------------------------------------------------------------


def _flatten_optimizer(opt_state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, per_param in opt_state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    items = list(tensors.items()) + list(meta["scalars"].items())
    for flat, value in items:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
) -> None:
    """Write ``model``/``ema``/``optimizer`` safetensors and ``state.json`` (atomically)."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files = {}
    files.update(write_tensors(tmp, "model", _cpu_state(model.state_dict()), shard_bytes=1 << 62)["files"])
    files.update(write_tensors(tmp, "ema", _cpu_state(ema.state_dict()), shard_bytes=1 << 62)["files"])
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    files.update(write_tensors(tmp, "optimizer", _cpu_state(opt_tensors), shard_bytes=1 << 62)["files"])
    state = {"format_version": FORMAT_VERSION, "files": files, "optimizer": opt_meta, **meta}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    _replace_dir(tmp, final)


def read_training_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / "state.json"
    if not path.is_file():
        raise CheckpointError(f"no training state at {path}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def load_training_state(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    """Restore weights and optimizer in place (verifying sha256s); returns the ``state.json`` dict."""
    d = Path(directory)
    meta = read_training_meta(d)
    for stem, module in (("model", model), ("ema", ema)):
        name = f"{stem}.safetensors"
        state = read_tensors(d, {name: meta["files"][name]})
        check_state_matches(module, state, what=f"{d}/{name}")
        module.load_state_dict(state, strict=True)
    opt_tensors = read_tensors(d, {"optimizer.safetensors": meta["files"]["optimizer.safetensors"]})
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, meta["optimizer"]))
    return meta
