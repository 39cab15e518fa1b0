"""The backbone's architecture: :class:`UNetConfig` (stored verbatim in the model card) and the
named sizes; both backbones (:mod:`recon_server.dpm.unet`, :mod:`recon_server.dpm.resunet`) build from it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from recon_server.dpm.edm import SIGMA_DATA

BACKBONES = ("unet", "resunet")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the backbone; stored verbatim in the model card (``architecture``).

    ``channel_mults[l] * base_channels`` channels at level ``l`` (resolution ``H / 2^l``);
    ``attn_levels`` are level indices with self-attention; ``label_gain`` multiplies the one-hot
    contrast vector (``None`` -> ``sqrt(num_slots)`` at creation; it is *not* changed when a slot
    is added, so old slots keep bit-identical embeddings).
    """

    in_channels: int = 2
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    num_blocks: int = 2
    attn_levels: tuple[int, ...] = (3,)
    dropout: float = 0.0
    emb_mult: int = 4
    channels_per_head: int = 64
    num_slots: int = 3
    label_gain: float | None = None
    sigma_data: float = SIGMA_DATA
    pad_mode: str = "reflect"
    backbone: str = "unet"  # "unet" (GroupNorm, attention) or "resunet" (recon_server.dpm.resunet)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.backbone == "resunet" and (self.attn_levels or self.dropout):
            raise ValueError("the resunet backbone has no attention and no dropout")
        if self.base_channels < 4 or self.num_blocks < 1 or not self.channel_mults:
            raise ValueError(f"invalid U-Net size: {self}")
        if any(m < 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be >= 1, got {self.channel_mults}")
        if any(not 0 <= a < len(self.channel_mults) for a in self.attn_levels):
            raise ValueError(f"attn_levels {self.attn_levels} outside 0..{len(self.channel_mults) - 1}")
        if self.num_slots < 1:
            raise ValueError("a model needs at least one contrast slot")
        if self.pad_mode not in ("reflect", "constant"):
            raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {self.pad_mode!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        object.__setattr__(self, "attn_levels", tuple(int(a) for a in self.attn_levels))
        if self.label_gain is None:
            object.__setattr__(self, "label_gain", math.sqrt(self.num_slots))

    @property
    def levels(self) -> int:
        return len(self.channel_mults)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes the backbone accepts without padding are multiples of this."""
        return 2 ** (self.levels - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attn_levels"] = list(self.attn_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown architecture keys {sorted(unknown)}")
        d = dict(d)
        for key in ("channel_mults", "attn_levels"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


# Named sizes. Parameter counts (3 slots) are asserted in tests/unit/dpm/test_unet.py and listed in
# docs/training.md.
MODEL_SIZES: dict[str, UNetConfig] = {
    # tests: ~100k parameters, 2 levels
    "tiny": UNetConfig(base_channels=12, channel_mults=(1, 2), num_blocks=1, attn_levels=(1,), emb_mult=2),
    # tests of the resunet backbone: ~21k parameters, 2 levels
    "tiny-res": UNetConfig(
        backbone="resunet", base_channels=12, channel_mults=(1, 2), num_blocks=1, attn_levels=(), emb_mult=2
    ),
    # shipped demo model: ~7M parameters (29 MB in float32), 4 levels (attention at 1/8 resolution)
    "demo": UNetConfig(base_channels=32, channel_mults=(1, 2, 4, 4), num_blocks=2, attn_levels=(3,)),
    # CPU stand-in for the shipped model when no GPU is available: ~0.5M parameters (2 MB), 4 levels,
    # one block per level, attention at 1/8 resolution; ~10 GFLOP per forward at 256x256 (demo: 84)
    "cpu": UNetConfig(base_channels=16, channel_mults=(1, 2, 2, 2), num_blocks=1, attn_levels=(3,)),
    # the CPU prior (issue 17): normalisation-free residual U-Net, widths 16-128, 2 blocks per level,
    # ~1.1M parameters; 87 patches/s (64x64, batch 16, bf16 + channels_last, one thread, AMD EPYC)
    "cpu-res": UNetConfig(
        backbone="resunet", base_channels=16, channel_mults=(1, 2, 4, 8), num_blocks=2, attn_levels=()
    ),
    # the paper's network size: DDPM++-like, cbase 128, cres 1,1,2,2,2,2,2, 4 blocks per level
    # (~113M parameters; the group's EDM ddpmpp has about 102M)
    "paper": UNetConfig(
        base_channels=128, channel_mults=(1, 1, 2, 2, 2, 2, 2), num_blocks=4, attn_levels=(4,), dropout=0.1
    ),
}


def model_config(size: str, *, num_slots: int) -> UNetConfig:
    """The named config ``size`` with ``num_slots`` contrast slots."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    return dataclasses.replace(MODEL_SIZES[size], num_slots=num_slots, label_gain=None)
