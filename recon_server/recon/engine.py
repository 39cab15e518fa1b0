"""Whole-volume diffusion reconstruction: device, batching, scale, seeds, posterior statistics.

:func:`reconstruct_volume` runs a posterior sampler (:mod:`recon_server.recon.dps`) on every slice
of a volume:

1. Checks: at least one slice, finite k-space, an ACS block in the mask (``masks.acs_region``).
2. Scale (the training rule, :func:`recon_server.recon.scale.slice_scale`): the 99th percentile of
   the coil-combined image of the ACS rows. When the scan's ACS block contains the training
   block (``round(0.08 ky)`` central rows, ``recon.scale.centre_acs``) exactly that block is used,
   so inference and training scale identically; a smaller ACS (e.g. R > 4 with the 0.04 fastMRI
   fraction) is used as it is. Without a fully sampled centre in the data (separate reference
   scans) the training block is zero-filled and divided by the fraction of its rows measured.
   ``y / scale`` goes to the sampler, the result is multiplied back.
3. Items = (posterior sample k, slice s), batched ``batch_size`` at a time on the device, each with
   its own CPU generator seeded by ``(seed, k, s)``: the noise of an item does not depend on the
   batch it lands in, so results are independent of the batch size (up to float rounding of
   batched convolutions) and identical draws reach CPU and CUDA runs.
4. Device: ``cuda`` when asked for and available, else the CPU (logged). On CUDA the network runs
   under bf16 autocast (``amp``; data consistency, FFTs and the schedule stay fp32/fp64) and the
   batch size, when not given, comes from free memory (``torch.cuda.mem_get_info``) and the
   measured peak memory of one item; on the CPU it is :data:`DEFAULT_CPU_BATCH`.
5. Several samples: the complex mean is the image (posterior-mean estimate); the per-pixel
   standard deviation of the *magnitudes* over the samples (ddof 1) is the uncertainty map.

Models are loaded once per (directory, card timestamp, device) by :func:`load_model`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recon_server.recon.classic import cg_sense, l1_wavelet
from recon_server.recon.dps import DenoiseFn, SampleResult, check_stop, dds_sample, dps_sample
from recon_server.recon.noise import noise_level
from recon_server.recon.sense import SenseOperator

log = logging.getLogger(__name__)

DEFAULT_CPU_BATCH = 4
MEMORY_FRACTION = 0.8
TRAINING_CENTER_FRACTION = 0.08  # recon.scale.DEFAULT_CENTER_FRACTION, the training scale rule
WARM_STARTS: dict[str, Callable[..., Tensor]] = {"cg-sense": cg_sense, "l1-wavelet": l1_wavelet}

__all__ = [
    "SamplerSpec",
    "VolumeResult",
    "bind_denoiser",
    "choose_batch_size",
    "item_generators",
    "load_model",
    "reconstruct_volume",
    "select_device",
    "volume_scale",
]


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler and its settings (``kind``: ``"dps"`` faithful, ``"dds"`` decomposed, no backprop).

    ``warm_sigma``: start from the ``warm_start`` image (``cg-sense`` or ``l1-wavelet``, both with
    their noise-calibrated weights) noised to this sigma (the schedule then runs from ``warm_sigma``
    down to ``sigma_min`` in ``steps`` steps); None = cold start at ``sigma_max``.
    ``data_weight``: lambda of the noise-calibrated CG weight of DDS (:mod:`recon_server.recon.dps`).
    """

    kind: str
    steps: int
    zeta: float = 1.0
    gamma: float = 0.05
    cg_iters: int = 5
    eta: float = 0.85
    solver: str = "euler"
    guard: float = 2.0
    sigma_min: float = 0.004
    sigma_max: float = 10.0
    rho: float = 7.0
    warm_sigma: float | None = None
    warm_start: str = "cg-sense"
    data_weight: float = 0.0
    renoise: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("dps", "dds"):
            raise ValueError(f"sampler kind must be 'dps' or 'dds', got {self.kind!r}")
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start must be one of {sorted(WARM_STARTS)}, got {self.warm_start!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.warm_sigma is not None and not self.sigma_min < self.warm_sigma <= self.sigma_max:
            raise ValueError(
                f"warm_sigma must be in ({self.sigma_min}, {self.sigma_max}], got {self.warm_sigma}"
            )

    @property
    def backprop(self) -> bool:
        return self.kind == "dps"

    def run(
        self,
        denoise: DenoiseFn,
        op: SenseOperator,
        y: Tensor,
        generators: Sequence[torch.Generator],
        init: Tensor | None,
        support: Tensor | None = None,
        noise_sigma: Tensor | None = None,
    ) -> SampleResult:
        sigma_max = self.warm_sigma if self.warm_sigma is not None else self.sigma_max
        common: dict[str, Any] = dict(
            steps=self.steps,
            generator=generators,
            sigma_min=self.sigma_min,
            sigma_max=sigma_max,
            rho=self.rho,
            init=init,
            support=support,
        )
        if self.kind == "dps":
            return dps_sample(denoise, op, y, zeta=self.zeta, solver=self.solver, guard=self.guard, **common)
        return dds_sample(
            denoise,
            op,
            y,
            gamma=self.gamma,
            cg_iters=self.cg_iters,
            eta=self.eta,
            noise_sigma=noise_sigma,
            data_weight=self.data_weight,
            renoise=self.renoise,
            **common,
        )

    def describe(self) -> dict[str, object]:
        """Settings for the provenance (only those the sampler uses)."""
        d: dict[str, object] = {"sampler": self.kind, "steps": self.steps}
        if self.kind == "dps":
            d.update(zeta=self.zeta, solver=self.solver, guard=self.guard)
        else:
            d.update(gamma=self.gamma, cg_iters=self.cg_iters, eta=self.eta, data_weight=self.data_weight)
            d.update(renoise=self.renoise)
        d.update(sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho)
        if self.warm_sigma is not None:
            d.update(warm_start=self.warm_start, warm_sigma=self.warm_sigma)
        return d


@dataclass
class VolumeResult:
    """image: complex64 ``(S, H, W)`` in data units (posterior mean); std: float32 ``(S, H, W)`` SD of
    the magnitude over samples (None for one sample); nfe: network evaluations per slice and sample."""

    image: Tensor
    std: Tensor | None
    nfe: int
    samples: int
    batch_size: int
    device: str
    amp: bool
    seconds: float
    settings: dict[str, object] = field(default_factory=dict)


# --------------------------------------------------------------------------- device and batches


def select_device(requested: str | torch.device | None) -> torch.device:
    """The device to run on: ``requested`` if usable, else the CPU (logged); None -> cuda if any."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("CUDA requested but not available: running the sampler on the CPU")
        return torch.device("cpu")
    return dev


def choose_batch_size(
    free_bytes: int, per_item_bytes: int, *, items: int, fraction: float = MEMORY_FRACTION
) -> int:
    """``floor(fraction * free / per_item)`` clamped to ``[1, items]``."""
    if items < 1:
        raise ValueError(f"items must be >= 1, got {items}")
    if per_item_bytes <= 0:
        return items
    return int(max(1, min(items, (fraction * free_bytes) // per_item_bytes)))


def _measure_item_bytes(run_one: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA memory of one item's sampler step above the current allocation."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_one()
    torch.cuda.synchronize(device)
    return max(1, torch.cuda.max_memory_allocated(device) - base)


def item_generators(seed: int, items: Sequence[tuple[int, int]]) -> list[torch.Generator]:
    """One CPU generator per (sample, slice) item, seeded by ``SeedSequence([seed, sample, slice])``."""
    gens = []
    for k, s in items:
        state = int(np.random.SeedSequence([int(seed), int(k), int(s)]).generate_state(1, np.uint64)[0])
        gens.append(torch.Generator().manual_seed(state & ((1 << 63) - 1)))
    return gens


# --------------------------------------------------------------------------- model


_MODELS: dict[tuple[str, int, str], tuple[Any, Any]] = {}


def load_model(model_dir: str | os.PathLike[str], device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """``(EDMDenoiser in eval mode, ModelCard)``, loaded once per directory, card version and device.

    ValueError (``CheckpointError``) when the directory holds no valid checkpoint.
    """
    from recon_server.dpm.checkpoint import CARD_FILE, load_checkpoint, resolve_checkpoint

    path = Path(model_dir)
    if not path.exists():
        raise ValueError(
            f"model directory {path} does not exist (set RECON_SERVER_MODEL_DIR or recon.model_dir)"
        )
    resolved = resolve_checkpoint(path).resolve()
    key = (str(resolved), (resolved / CARD_FILE).stat().st_mtime_ns, str(torch.device(device)))
    if key not in _MODELS:
        model, card = load_checkpoint(resolved, device=device)
        model.requires_grad_(False)  # DPS needs gradients w.r.t. the input only
        _MODELS[key] = (model, card)
        log.info("loaded model %s (%s %s) on %s", resolved, card.name, card.version, device)
    return _MODELS[key]


def network_precision(
    denoiser: Any, *, device: torch.device, amp: bool, cpu_precision: str
) -> tuple[bool, bool]:
    """``(bf16 autocast, channels_last)`` for running ``denoiser``: bf16 on CUDA for torch modules
    when ``amp``; on the CPU ``cpu_precision`` (``fp32``, ``bf16``, ``fp32-cl``, ``bf16-cl``, or
    ``auto``: the fastest, measured once per model by
    :func:`recon_server.dpm.precision.inference_precision`) when ``amp``."""
    if not (amp and isinstance(denoiser, torch.nn.Module)):
        return False, False
    if device.type == "cuda":
        return True, False
    if cpu_precision == "fp32":
        return False, False
    from recon_server.dpm.precision import CpuPrecision, inference_precision

    chosen = inference_precision(denoiser) if cpu_precision == "auto" else CpuPrecision.named(cpu_precision)
    return chosen.bf16, chosen.channels_last


def bind_denoiser(
    denoiser: Any, contrast: str | int, *, device: torch.device, bf16: bool, channels_last: bool
) -> DenoiseFn:
    """``denoise(x, sigma)`` for one contrast, under bf16 autocast and in channels_last as given
    (:func:`network_precision` decides both).

    ``denoiser``: any object with ``__call__(x, sigma, labels)`` (torch or ONNX Runtime backend);
    a contrast name it lacks raises ValueError naming its slots (``contrast_index``).
    """
    label: int | str = contrast
    if isinstance(contrast, str):
        if not contrast:
            raise ValueError("the scan's contrast is unknown; the diffusion methods need one")
        label = denoiser.contrast_index(contrast)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        from recon_server.dpm.precision import set_memory_format

        set_memory_format(denoiser, channels_last=True)

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return denoiser(x.contiguous(memory_format=memory_format), sigma, label).float()

    return denoise


# --------------------------------------------------------------------------- volume


def _line_mask(mask: Tensor | np.ndarray) -> np.ndarray:
    m = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    m = m.astype(bool)
    while m.ndim > 2:  # per-slice masks: the ACS rule uses the first slice's
        m = m[0]
    return np.asarray(m.any(axis=1) if m.ndim == 2 else m)


def volume_scale(kspace: Tensor, maps: Tensor, mask: Tensor | np.ndarray) -> Tensor:
    """Per-slice scale ``(S,)`` by the training rule (module docstring, step 2)."""
    from recon_server.recon.masks import acs_region
    from recon_server.recon.scale import centre_acs, slice_scale

    lines = _line_mask(mask)
    if lines.shape[0] != kspace.shape[-2]:
        raise ValueError(f"mask has {lines.shape[0]} phase-encode lines, k-space {kspace.shape[-2]}")
    t0, t1 = centre_acs(kspace.shape[-2], TRAINING_CENTER_FRACTION)
    try:
        start, stop = acs_region(lines)
    except ValueError:
        # No fully sampled centre in the data (a separate reference scan calibrated the coils):
        # the training block zero-filled, its amplitude divided by the fraction of it measured.
        fraction = float(lines[t0:t1].mean())
        if fraction == 0:
            raise ValueError("no phase-encode line near the k-space centre: no intensity scale") from None
        return slice_scale(kspace[:, :, t0:t1, :], maps, acs=(t0, t1)) / fraction
    if start <= t0 and t1 <= stop:
        start, stop = t0, t1
    scale = slice_scale(kspace[:, :, start:stop, :], maps, acs=(start, stop))
    if bool((scale <= 1e-19).any()):  # slice_scale clamps a zero percentile to 1e-20
        raise ValueError(
            "the ACS image of a slice is zero (empty coil maps or calibration): no intensity scale"
        )
    return scale


def _check_volume(kspace: Tensor, maps: Tensor) -> None:
    if not isinstance(kspace, Tensor) or kspace.ndim != 4 or not kspace.is_complex():
        raise ValueError(
            f"kspace must be complex (slices, coils, ky, kx), got {tuple(getattr(kspace, 'shape', ()))}"
        )
    if kspace.shape[0] == 0:
        raise ValueError("the volume has no slices")
    if tuple(maps.shape) != tuple(kspace.shape):
        raise ValueError(f"maps shape {tuple(maps.shape)} does not match k-space {tuple(kspace.shape)}")
    if not bool(torch.isfinite(torch.view_as_real(kspace)).all()):
        raise ValueError("k-space contains NaN or inf")


def reconstruct_volume(
    denoiser: Any,
    contrast: str | int,
    kspace: Tensor,
    maps: Tensor,
    mask: Tensor | np.ndarray,
    spec: SamplerSpec,
    *,
    samples: int = 1,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    amp: bool = True,
    noise_sigma: float | None = None,
    cpu_precision: str = "fp32",
    progress: Callable[[int, int], None] | None = None,
) -> VolumeResult:
    """Run ``spec`` on every slice (``samples`` posterior samples each); see the module docstring.

    ``kspace``/``maps``: complex ``(S, C, ky, kx)``; ``mask``: ``(ky, kx)``, ``(S, ky, kx)`` or
    ``(S, 1, ky, kx)``. ``noise_sigma``: the noise of one k-space sample (1 after prewhitening);
    None: estimated from the data (:func:`recon_server.recon.noise.noise_level`).
    ``progress(done, total)`` after each batch of items. Returns a :class:`VolumeResult` with
    tensors on the CPU.
    """
    t_start = time.perf_counter()
    _check_volume(kspace, maps)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    dev = select_device(device)
    kspace = kspace.to(dev, torch.complex64)
    maps = maps.to(dev, torch.complex64)
    mask_t = torch.as_tensor(mask, device=dev)
    per_slice_mask = mask_t.ndim >= 3 and mask_t.shape[0] == kspace.shape[0] and kspace.shape[0] > 1
    scale = volume_scale(kspace, maps, mask_t).to(dev)
    sigma_y: Tensor | None = None  # k-space noise in the sampler's units, where a step needs it
    if noise_sigma is not None:
        sigma_y = torch.full_like(scale, float(noise_sigma)) / scale
    elif spec.kind == "dds" and spec.data_weight > 0:
        sigma_y = noise_level(kspace, mask_t).to(dev) / scale
    bf16, channels_last = network_precision(denoiser, device=dev, amp=amp, cpu_precision=cpu_precision)
    denoise = bind_denoiser(denoiser, contrast, device=dev, bf16=bf16, channels_last=channels_last)
    n_slices = kspace.shape[0]
    items = [(k, s) for k in range(samples) for s in range(n_slices)]

    def operator(idx: Tensor) -> SenseOperator:
        return SenseOperator(maps[idx], mask_t[idx] if per_slice_mask else mask_t)

    def run(batch: list[tuple[int, int]]) -> SampleResult:
        idx = torch.tensor([s for _, s in batch], device=dev)
        op = operator(idx)
        y = kspace[idx] * op.mask / scale[idx, None, None, None]
        noise = None if sigma_y is None else sigma_y[idx]
        init = None
        if spec.warm_sigma is not None:
            init = WARM_STARTS[spec.warm_start](y, maps[idx], op.mask, noise_sigma=noise)
        support = op.maps.abs().square().sum(dim=1) > 0  # pixels some coil sees (ESPIRiT crops)
        return spec.run(denoise, op, y, item_generators(seed, batch), init, support, noise)

    if batch_size is None:
        one = torch.tensor([0], device=dev)

        def one_step() -> object:  # one item, one step: the memory an item needs on the device
            y = kspace[:1] / scale[:1, None, None, None]
            fast = dataclasses.replace(spec, steps=1)
            return fast.run(denoise, operator(one), y, item_generators(seed, [(0, 0)]), None)

        batch_size = _auto_batch_size(one_step, dev, len(items))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images, residuals, nfe = _run_items(
        run, items, (samples, n_slices, *kspace.shape[-2:]), scale, batch_size, progress
    )
    return _volume_result(
        spec, images, residuals, nfe, seed=seed, batch_size=batch_size, device=dev, bf16=bf16, started=t_start
    )


def _volume_result(
    spec: SamplerSpec,
    images: Tensor,
    residuals: Tensor,
    nfe: int,
    *,
    seed: int,
    batch_size: int,
    device: torch.device,
    bf16: bool,
    started: float,
) -> VolumeResult:
    """Mean (and SD over the posterior samples) of ``images`` ``(samples, slices, ky, kx)``."""
    samples = images.shape[0]
    settings = {
        **spec.describe(),
        "samples": samples,
        "seed": seed,
        "nfe_per_slice": nfe * samples,
        "batch_size": batch_size,
        "device": str(device),
        "amp_bf16": bf16,
        "residual_rel_mean": round(float(residuals.mean()), 5),
    }
    return VolumeResult(
        image=images.mean(dim=0),
        std=images.abs().std(dim=0, correction=1) if samples > 1 else None,
        nfe=nfe,
        samples=samples,
        batch_size=batch_size,
        device=str(device),
        amp=bf16,
        seconds=time.perf_counter() - started,
        settings=settings,
    )


def _auto_batch_size(one_step: Callable[[], object], device: torch.device, items: int) -> int:
    """Items per batch: from free GPU memory and one measured step on CUDA, else a fixed CPU batch."""
    if device.type != "cuda":
        return min(DEFAULT_CPU_BATCH, items)
    per_item = _measure_item_bytes(one_step, device)
    free, _ = torch.cuda.mem_get_info(device)
    return choose_batch_size(free, per_item, items=items)


def _run_items(
    run: Callable[[list[tuple[int, int]]], SampleResult],
    items: list[tuple[int, int]],
    shape: tuple[int, ...],
    scale: Tensor,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[Tensor, Tensor, int]:
    """``(images (samples, slices, ky, kx) in data units, residual per item, NFE)``, batch by batch."""
    images = torch.empty(shape, dtype=torch.complex64)
    residuals = torch.empty(len(items))
    nfe = 0
    for start in range(0, len(items), batch_size):
        check_stop()  # the worker's time limit / cancellation, also between batches
        batch = items[start : start + batch_size]
        result = run(batch)
        nfe = result.nfe
        rescaled = (result.image * scale[[s for _, s in batch], None, None]).cpu()
        for j, (k, s) in enumerate(batch):
            images[k, s] = rescaled[j]
        residuals[start : start + len(batch)] = result.residual.cpu()
        if progress is not None:
            progress(start + len(batch), len(items))
    return images, residuals, nfe
