"""A normalisation-free residual U-Net for CPU training (backbone ``"resunet"``), after DRUNet.

Made for two CPU cores (docs/training.md, issue 17): no GroupNorm (slow in bf16 / channels_last on
CPU and not needed at these depths), no attention, additive skips instead of concatenation,
strided-conv down / transposed-conv up, bias-free convolutions (KAIR's DRUNet, arXiv 2008.13751:
bias-free denoisers generalise across noise levels). Per level ``num_blocks`` residual blocks

    h = x + conv3x3(relu(conv3x3(x)) * (1 + scale(emb)))

where ``emb`` is the same noise + contrast embedding as the GroupNorm U-Net's
(:mod:`recon_server.dpm.conditioning`). The modulation is a per-channel gain only, so every convolution
stays bias-free. Widths are ``base_channels * channel_mults[l]``; the EDM preconditioning around
it lives in :class:`recon_server.dpm.unet.EDMDenoiser`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from recon_server.dpm.conditioning import ConditionedBackbone

if TYPE_CHECKING:
    from recon_server.dpm.architecture import UNetConfig

INIT_ZERO_SCALE = 1e-5  # residual branches and the output start near zero: D(x) ~ c_skip x


class ModulatedBlock(nn.Module):
    """``x + conv(relu(conv(x)) * (1 + scale))``, the scale per channel from the embedding."""

    def __init__(self, channels: int, emb_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.scale = nn.Linear(emb_dim, channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        gain = 1.0 + self.scale(emb)[:, :, None, None].to(x.dtype)
        return x + self.conv2(F.relu(self.conv1(x)) * gain)


class ResUNet(ConditionedBackbone):
    """Backbone ``F(x_in, c_noise, onehot)`` -> same shape as ``x_in`` (sizes multiple of 2^(L-1))."""

    def __init__(self, config: UNetConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(config)
        c, emb_dim = config, self.emb_dim
        widths = [c.base_channels * m for m in c.channel_mults]
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1, bias=False)
        self.enc = nn.ModuleList(
            nn.ModuleList(ModulatedBlock(w, emb_dim) for _ in range(c.num_blocks)) for w in widths
        )
        self.down = nn.ModuleList(
            nn.Conv2d(a, b, 2, stride=2, bias=False) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(b, a, 2, stride=2, bias=False)
            for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.dec = nn.ModuleList(
            nn.ModuleList(ModulatedBlock(w, emb_dim) for _ in range(c.num_blocks)) for w in widths[:-1]
        )
        self.conv_out = nn.Conv2d(widths[0], c.in_channels, 3, padding=1, bias=False)
        self._init_weights(generator)

    @torch.no_grad()
    def _init_weights(self, generator: torch.Generator | None) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ModulatedBlock):
                m.conv2.weight.mul_(INIT_ZERO_SCALE)
                m.scale.weight.zero_()
        self.conv_out.weight.mul_(INIT_ZERO_SCALE)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(c_noise, onehot)
        h = self.conv_in(x)
        skips = []
        for level, blocks in enumerate(self.enc):
            for block in cast(nn.ModuleList, blocks):
                h = block(h, emb)
            if level < len(self.down):
                skips.append(h)
                h = self.down[level](h)
        for level in reversed(range(len(self.dec))):
            h = self.up[level](h) + skips.pop()
            for block in cast(nn.ModuleList, self.dec[level]):
                h = block(h, emb)
        return self.conv_out(h)
