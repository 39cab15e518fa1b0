"""Contrast-conditioned U-Net with EDM preconditioning for two-channel (real, imaginary) MRI slices.

Backbone (in the spirit of EDM's DDPM++ / SongUNet, written compactly here):

- noise embedding: sinusoidal positional embedding of ``c_noise = ln(sigma)/4`` -> Linear -> SiLU
  -> Linear (width ``emb = emb_mult * base``);
- contrast embedding: a one-hot vector over the checkpoint's contrast slots times ``label_gain``
  (``sqrt(num_slots)`` at creation, then frozen in the config) -> Linear -> SiLU -> Linear, *added*
  to the noise embedding; ``silu(noise + contrast)`` is what every block receives;
- residual blocks: GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> per-block affine
  ``h * (1 + scale) + shift`` from the embedding -> SiLU -> dropout -> conv3x3, plus a (1x1) skip,
  scaled by ``1/sqrt(2)``; self-attention after the blocks of the levels in ``attn_levels`` and in
  the middle; average-pool / nearest-neighbour resampling blocks between levels;
- encoder/decoder with a skip connection from every encoder block to a decoder block.

Inputs of any size are padded to a multiple of ``2^(levels-1)`` (reflect, or zeros for tiny
images) and cropped back. The :class:`EDMDenoiser` wrapper owns the preconditioning
(:func:`recon_server.dpm.edm.precond_coefficients`) and the contrast slots.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recon_server.dpm.architecture import UNetConfig, model_config
from recon_server.dpm.conditioning import ConditionedBackbone
from recon_server.dpm.edm import precond_coefficients
from recon_server.dpm.resunet import ResUNet

SKIP_SCALE = 1.0 / math.sqrt(2.0)
INIT_ZERO_SCALE = 1e-5  # output convs start near zero (EDM's init_zero): blocks begin as identity

Labels = int | str | Sequence[int | str] | torch.Tensor


def _groups(channels: int) -> int:
    # Largest group count <= 32 that divides the channels and leaves >= 4 channels per group.
    g = min(32, max(1, channels // 4))
    while channels % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """Residual block with embedding affine, optional resampling and optional self-attention."""

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_dim: int,
        *,
        resample: str | None = None,
        attention: bool = False,
        dropout: float = 0.0,
        channels_per_head: int = 64,
    ) -> None:
        super().__init__()
        self.resample = resample
        self.norm1 = nn.GroupNorm(_groups(cin), cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if (cin != cout or resample is not None) else None
        self.heads = max(1, cout // channels_per_head) if attention else 0
        if attention:
            self.norm_attn = nn.GroupNorm(_groups(cout), cout, eps=1e-6)
            self.qkv = nn.Conv2d(cout, 3 * cout, 1)
            self.proj = nn.Conv2d(cout, cout, 1)
        self.zero_init: list[nn.Conv2d] = [self.conv2] + ([self.proj] if attention else [])

    def _resample(self, t: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(t, 2)
        if self.resample == "up":
            return F.interpolate(t, scale_factor=2.0, mode="nearest")
        return t

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self._resample(F.silu(self.norm1(x))))
        x = self._resample(x)
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm2(h), scale + 1.0))
        h = self.conv2(self.dropout(h))
        x = (h + (self.skip(x) if self.skip is not None else x)) * SKIP_SCALE
        if self.heads:
            b, c, hh, ww = x.shape
            qkv = self.qkv(self.norm_attn(x)).reshape(b, 3, self.heads, c // self.heads, hh * ww)
            q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # (B, heads, HW, d)
            a = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, hh, ww)
            x = (x + self.proj(a)) * SKIP_SCALE
        return x


class UNet(ConditionedBackbone):
    """Backbone ``F(x_in, c_noise, onehot)`` -> same shape as ``x_in`` (sizes multiple of 2^(L-1))."""

    def __init__(self, config: UNetConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(config)
        c, emb_dim = config, self.emb_dim
        block: dict[str, Any] = dict(
            emb_dim=emb_dim, dropout=c.dropout, channels_per_head=c.channels_per_head
        )
        ch = c.base_channels * c.channel_mults[0]
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)
        skips = [ch]
        self.enc = nn.ModuleList()
        for lvl, mult in enumerate(c.channel_mults):
            for _ in range(c.num_blocks):
                self.enc.append(ResBlock(ch, c.base_channels * mult, attention=lvl in c.attn_levels, **block))
                ch = c.base_channels * mult
                skips.append(ch)
            if lvl < c.levels - 1:
                self.enc.append(ResBlock(ch, ch, resample="down", **block))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, attention=True, **block), ResBlock(ch, ch, **block)])
        self.dec = nn.ModuleList()
        for lvl in reversed(range(c.levels)):
            out = c.base_channels * c.channel_mults[lvl]
            for _ in range(c.num_blocks + 1):
                self.dec.append(ResBlock(ch + skips.pop(), out, attention=lvl in c.attn_levels, **block))
                ch = out
            if lvl > 0:
                self.dec.append(ResBlock(ch, ch, resample="up", **block))
        self.norm_out = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, c.in_channels, 3, padding=1)
        self._init_weights(generator)

    @torch.no_grad()
    def _init_weights(self, generator: torch.Generator | None) -> None:
        # Xavier-uniform everywhere (DDPM++), biases zero; residual outputs and the final conv near
        # zero so that the initial denoiser is D(x) ~ c_skip x.
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        zero = [self.conv_out] + [z for b in self.modules() if isinstance(b, ResBlock) for z in b.zero_init]
        for m in zero:
            assert isinstance(m, nn.Conv2d)
            m.weight.mul_(INIT_ZERO_SCALE)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(c_noise, onehot)
        h = self.conv_in(x)
        skips = [h]
        for blk in self.enc:
            h = blk(h, emb)
            skips.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        for blk in self.dec:
            if blk.resample is None:
                h = torch.cat([h, skips.pop()], dim=1)
            h = blk(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class EDMDenoiser(nn.Module):
    """``D(x, sigma, labels) = c_skip x + c_out F(c_in x, c_noise, onehot)`` with named contrast slots.

    ``x``: float32 (B, 2, H, W) real/imaginary of scale-normalised slices, any H, W.
    ``sigma``: a float, a 0-d tensor or a (B,) tensor of noise levels (> 0).
    ``labels``: a contrast name or slot index (same for the whole batch), a sequence of names or
    indices (B,), an integer tensor (B,), or float one-hot / soft vectors (B, num_slots).
    """

    def __init__(
        self, config: UNetConfig, contrast_slots: Sequence[str], *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        slots = [normalise_contrast(s) for s in contrast_slots]
        if len(slots) != config.num_slots:
            raise ValueError(f"{len(slots)} contrast names {slots} for {config.num_slots} slots")
        if len(set(slots)) != len(slots):
            raise ValueError(f"duplicate contrast slots {slots}")
        self._slots = slots
        backbone = ResUNet if config.backbone == "resunet" else UNet
        self.net: UNet | ResUNet = backbone(config, generator=generator)

    @property
    def config(self) -> UNetConfig:
        return self.net.config

    @property
    def contrast_slots(self) -> tuple[str, ...]:
        return tuple(self._slots)

    def contrast_index(self, name: str) -> int:
        """Slot index of a contrast; ValueError naming the available slots if absent."""
        return slot_index(self._slots, name)

    def onehot(self, labels: Labels, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Labels in any accepted form -> float32 (B, num_slots)."""
        return labels_onehot(self._slots, labels, batch, device)

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor, labels: Labels) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must be (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        x = x.float()
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if s.numel() == 1:
            s = s.expand(b)
        if s.numel() != b:
            raise ValueError(f"sigma must be a scalar or have {b} entries, got {s.numel()}")
        c_skip, c_out, c_in, c_noise = precond_coefficients(s, self.config.sigma_data)
        onehot = self.onehot(labels, b, x.device)
        x_in = self._pad(c_in.reshape(-1, 1, 1, 1) * x)
        f = self._crop(self.net(x_in, c_noise, onehot), h, w)
        return c_skip.reshape(-1, 1, 1, 1) * x + c_out.reshape(-1, 1, 1, 1) * f.float()

    def _pad_amounts(self, h: int, w: int) -> tuple[int, int, int, int]:
        m = self.config.size_multiple
        ph, pw = (-h) % m, (-w) % m
        return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = pads = self._pad_amounts(x.shape[2], x.shape[3])
        if not any(pads):
            return x
        reflect_ok = max(left, right) < x.shape[3] and max(top, bottom) < x.shape[2]
        mode = self.config.pad_mode if reflect_ok else "constant"
        return F.pad(x, pads, mode=mode)

    def _crop(self, f: torch.Tensor, h: int, w: int) -> torch.Tensor:
        left, _, top, _ = self._pad_amounts(h, w)
        return f[:, :, top : top + h, left : left + w]

    @torch.no_grad()
    def add_contrast_slot(self, name: str, *, init: str = "mean") -> int:
        """Append a new contrast slot (fine-tuning); returns its index.

        The first Linear of the label net gains one input column: ``init="mean"`` sets it to the
        mean of the existing columns (the new contrast starts as the average known contrast),
        ``"zeros"`` to zero (it starts like the unconditional embedding). ``label_gain`` is kept, so
        the existing slots' embeddings, and hence the network's outputs on them, are unchanged.
        """
        key = normalise_contrast(name)
        if key in self._slots:
            raise ValueError(f"contrast {key!r} already has slot {self._slots.index(key)}")
        if init not in ("mean", "zeros"):
            raise ValueError(f"init must be 'mean' or 'zeros', got {init!r}")
        old = self.net.label_net[0]
        assert isinstance(old, nn.Linear)
        new = nn.Linear(
            old.in_features + 1, old.out_features, device=old.weight.device, dtype=old.weight.dtype
        )
        new.weight[:, :-1] = old.weight
        new.weight[:, -1] = old.weight.mean(dim=1) if init == "mean" else 0.0
        new.bias.copy_(old.bias)
        self.net.label_net[0] = new
        self.net.config = dataclasses.replace(self.net.config, num_slots=new.in_features)
        self._slots.append(key)
        return len(self._slots) - 1


def slot_index(slots: Sequence[str], name: str) -> int:
    """Index of contrast ``name`` among ``slots``; ValueError naming the available slots if absent."""
    key = normalise_contrast(name)
    if key not in slots:
        raise ValueError(f"contrast {name!r} is not a slot of this model; its slots are {list(slots)}")
    return list(slots).index(key)


def labels_onehot(
    slots: Sequence[str], labels: Labels, batch: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Contrast labels (names, slot indices, an index tensor or one-hot rows) -> float32 (B, slots).

    Shared by :class:`EDMDenoiser` and the ONNX Runtime denoiser, so both accept the same forms.
    """
    n = len(slots)
    if isinstance(labels, torch.Tensor) and labels.is_floating_point():
        if labels.shape != (batch, n):
            raise ValueError(f"one-hot labels must be ({batch}, {n}), got {tuple(labels.shape)}")
        return labels.to(device=device, dtype=torch.float32)
    if isinstance(labels, str | int):
        labels = [labels] * batch
    if isinstance(labels, torch.Tensor):
        idx = labels.to(device=device, dtype=torch.long).reshape(-1)
    else:
        idx = torch.tensor(
            [slot_index(slots, v) if isinstance(v, str) else int(v) for v in labels],
            dtype=torch.long,
            device=device,
        )
    if idx.numel() != batch:
        raise ValueError(f"{idx.numel()} labels for a batch of {batch}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"slot index out of range 0..{n - 1}: {idx.tolist()}")
    return F.one_hot(idx, n).to(torch.float32)


def normalise_contrast(name: str) -> str:
    """Canonical contrast label: stripped, upper case, non-empty (``t1post`` -> ``T1POST``)."""
    key = str(name).strip().upper()
    if not key:
        raise ValueError("empty contrast name")
    return key


def count_parameters(module: nn.Module) -> int:
    """Number of trainable and frozen parameters (buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


def build_denoiser(
    size: str | UNetConfig, contrast_slots: Sequence[str], *, seed: int = 0, **overrides: Any
) -> EDMDenoiser:
    """A freshly initialised denoiser of a named size (or explicit config), deterministic in ``seed``."""
    cfg = size if isinstance(size, UNetConfig) else model_config(size, num_slots=len(contrast_slots))
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    gen = torch.Generator().manual_seed(seed)
    return EDMDenoiser(cfg, contrast_slots, generator=gen)
