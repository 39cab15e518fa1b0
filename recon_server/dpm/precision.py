"""Pick bf16 autocast and channels_last for CPU training by measuring them on the machine at hand.

On Intel Xeons with AMX (and AMD EPYCs with AVX512-BF16) bf16 convolutions run 2-4x faster than
fp32 at 32-128 channels; elsewhere bf16 is emulated and slower (shared/reference/cpu-prior.md).
channels_last helps the oneDNN convolutions on some CPUs and not others. So the trainer times one
forward + backward of the real model on a real-sized batch in each of the four settings and keeps
the fastest (weights, EMA, optimizer state and the loss stay fp32 in every setting; the EDM
``c_skip x`` path is computed in fp32 by :class:`recon_server.dpm.unet.EDMDenoiser`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from recon_server.dpm.edm import EDMLoss

CPU_PRECISIONS = ("auto", "fp32", "bf16", "fp32-cl", "bf16-cl")


@dataclass(frozen=True)
class CpuPrecision:
    """The chosen setting and the measured patches/s of every setting tried (empty: not probed)."""

    bf16: bool = False
    channels_last: bool = False
    measured: dict[str, float] | None = None

    @property
    def name(self) -> str:
        return ("bf16" if self.bf16 else "fp32") + ("-cl" if self.channels_last else "")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name}

    @classmethod
    def named(cls, name: str) -> CpuPrecision:
        if name not in CPU_PRECISIONS or name == "auto":
            raise ValueError(f"CPU precision must be one of {CPU_PRECISIONS}, got {name!r}")
        return cls(bf16=name.startswith("bf16"), channels_last=name.endswith("-cl"))


def set_memory_format(model: nn.Module, *, channels_last: bool) -> nn.Module:
    """Convert ``model``'s 4-D weights in place to channels_last (or back); returns it."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(memory_format=fmt)  # type: ignore[call-overload]


def _slots(model: nn.Module) -> int:
    config: Any = model.config
    return int(config.num_slots)


def _time_one(model: nn.Module, setting: CpuPrecision, batch: int, crop: int, repeats: int) -> float:
    net = set_memory_format(copy.deepcopy(model).train(), channels_last=setting.channels_last)
    fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = (0.5 * torch.randn(batch, 2, crop, crop, generator=gen)).contiguous(memory_format=fmt)
    labels = torch.zeros(batch, _slots(model))
    labels[:, 0] = 1.0
    loss_fn = EDMLoss()
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms oneDNN's kernel cache
        z, n = loss_fn.draw(x, generator=gen)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting.bf16):
            loss = loss_fn(net, x, labels, ln_sigma_noise=z, noise=n.contiguous(memory_format=fmt)).mean()
        loss.backward()
        best = min(best, time.perf_counter() - start)
    return batch / best


def _fastest(rate: Callable[[CpuPrecision], float]) -> CpuPrecision:
    """Every setting's ``rate(setting)`` (higher is faster); the fastest, with all measurements."""
    measured = {name: rate(CpuPrecision.named(name)) for name in CPU_PRECISIONS[1:]}
    best = max(measured, key=lambda k: measured[k])
    return dataclasses.replace(CpuPrecision.named(best), measured=measured)


def probe_cpu_precision(model: nn.Module, *, batch: int, crop: int, repeats: int = 2) -> CpuPrecision:
    """Time the four settings on a copy of ``model``; the fastest, with every measurement."""
    return _fastest(lambda setting: round(_time_one(model, setting, batch, crop, repeats), 1))


_INFERENCE: weakref.WeakKeyDictionary[nn.Module, CpuPrecision] = weakref.WeakKeyDictionary()


@torch.no_grad()
def inference_precision(model: nn.Module, *, size: int = 128, repeats: int = 2) -> CpuPrecision:
    """The fastest CPU setting for sampling with ``model`` (measured once per model and process).

    Times one ``(1, 2, size, size)`` forward in each setting; the model is left in the chosen
    memory format. The choice is cached: a model object is probed once.
    """
    if model in _INFERENCE:
        return _INFERENCE[model]
    gen = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(1, 2, size, size, generator=gen)
    labels = torch.zeros(1, _slots(model))
    labels[:, 0] = 1.0
    sigma = torch.full((1,), 0.1)

    def forwards_per_second(setting: CpuPrecision) -> float:
        set_memory_format(model, channels_last=setting.channels_last)
        fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
        xx = x.contiguous(memory_format=fmt)
        best = float("inf")
        for _ in range(repeats + 1):  # the first pass warms oneDNN's kernel cache
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting.bf16):
                model(xx, sigma, labels)
            best = min(best, time.perf_counter() - start)
        return round(1.0 / best, 2)

    chosen = _fastest(forwards_per_second)
    set_memory_format(model, channels_last=chosen.channels_last)
    _INFERENCE[model] = chosen
    return chosen
