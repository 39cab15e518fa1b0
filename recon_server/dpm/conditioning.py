"""The noise + contrast conditioning that every block of a backbone receives (EDM's SongUNet).

- noise: sinusoidal positional embedding of ``c_noise = ln(sigma)/4`` -> Linear -> SiLU -> Linear;
- contrast: the one-hot slot times ``label_gain`` -> Linear -> SiLU -> Linear (``label_net``; its
  first layer grows a column when fine-tuning adds a contrast), **added** to the noise embedding;
  ``silu(noise + contrast)`` is what the blocks get.

Both backbones (:class:`recon_server.dpm.unet.UNet`, :class:`recon_server.dpm.resunet.ResUNet`)
derive from :class:`ConditionedBackbone`, so the two nets keep the same parameter names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from recon_server.dpm.architecture import UNetConfig


def positional_embedding(x: torch.Tensor, channels: int, max_positions: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(x f_k), sin(x f_k)]``, ``f_k = max_positions^(-k/(K-1))`` (B, C)."""
    half = channels // 2
    k = torch.arange(half, dtype=torch.float32, device=x.device) / max(half - 1, 1)
    freqs = (1.0 / max_positions) ** k
    arg = x.float()[:, None] * freqs[None, :]
    return torch.cat([arg.cos(), arg.sin()], dim=1)


class ConditionedBackbone(nn.Module):
    """Holds ``config``, ``noise_mlp`` and ``label_net`` (width ``emb_dim``) and computes the embedding."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.emb_dim = config.emb_mult * config.base_channels
        self.noise_mlp = nn.Sequential(
            nn.Linear(config.base_channels, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim)
        )
        # label_net[0] is the layer that grows a column when a contrast slot is added.
        self.label_net = nn.Sequential(
            nn.Linear(config.num_slots, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim)
        )

    def embedding(self, c_noise: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """Per-sample block conditioning ``silu(noise_mlp(pos(c_noise)) + label_net(gain onehot))``."""
        gain = float(self.config.label_gain or 1.0)
        pos = positional_embedding(c_noise, self.config.base_channels)
        return F.silu(self.noise_mlp(pos) + self.label_net(onehot.to(pos.dtype) * gain))
