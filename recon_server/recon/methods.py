"""Registry of reconstruction methods: name -> callable on a :class:`ReconProblem`.

Names are what configs, the CLI and the wire use (an explicit registry, never a module path).

Classical: ``zero-filled``, ``cg-sense``, ``l1-wavelet`` (:mod:`recon_server.recon.classic`).
Diffusion (:class:`DiffusionMethod`, need a trained model; docs/dps.md):

- ``dps``: faithful DPS (paper), gradient through the network, Euler on the EDM schedule, steps
  and sigma range from the model card, zeta per acceleration from the card (fallback
  :data:`FALLBACK_ZETA` while the card's entries are untuned placeholders);
- ``dps-fast``: decomposed sampler (DDS): denoise, CG data consistency, DDIM re-noise, no backprop;
- ``dps-warm``: the same steps started from CG-SENSE noised to sigma 1 (the end of the schedule).

Their settings travel explicitly: a :class:`DiffusionSettings` (model directory, preloaded
denoiser, samples, seed, device, per-method overrides) goes with each call of :func:`run_method`
(the service builds it from its configuration, evaluation and the CLI from their options). The
model directory: ``RECON_SERVER_MODEL_DIR`` if set, else ``DiffusionSettings.model_dir``, else
:data:`DEFAULT_MODEL_DIR`. A preloaded denoiser (e.g. the ONNX Runtime one) in
``DiffusionSettings.denoiser`` is used instead of loading the directory; the no-backprop samplers
run on it, ``dps`` needs torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from recon_server.recon.classic import cg_sense, l1_wavelet, zero_filled

__all__ = [
    "DEFAULT_MODEL_DIR",
    "FALLBACK_GAMMA",
    "FALLBACK_ZETA",
    "METHODS",
    "DiffusionMethod",
    "DiffusionSettings",
    "MethodOutput",
    "ReconMethod",
    "ReconProblem",
    "get_method",
    "ProgressFn",
    "pick_by_acceleration",
    "run_method",
]

MODEL_DIR_ENV = "RECON_SERVER_MODEL_DIR"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "flair-stroke-demo"
# Documented fallbacks while a card's entries are placeholders ("tuned": false): the reference's
# zeta ~ 1 for DPS (normalised gradient step) and a CG proximity weight of 0.05 for DDS (data
# trusted ~95% on the sampled k-space, the denoised image elsewhere). docs/dps.md.
FALLBACK_ZETA: dict[float, float] = {2: 1.0, 4: 1.0, 6: 1.0, 8: 1.0}
FALLBACK_GAMMA: dict[float, float] = {2: 0.05, 4: 0.05, 6: 0.05, 8: 0.05}


@dataclass
class ReconProblem:
    """One batch of slices to reconstruct.

    kspace: complex64 ``(slices, coils, ky, kx)`` (prewhitened; zeros where not acquired).
    maps:   complex64 ``(slices, coils, ky, kx)`` coil sensitivities.
    mask:   bool/real ``(ky, kx)``, ``(slices, ky, kx)`` or ``(slices, 1, ky, kx)``.
    acceleration: nominal R (samplers may pick settings by it); contrast: label such as ``FLAIR``.
    noise_sigma: standard deviation of the noise of one complex k-space sample (1.0 after
    prewhitening with a noise scan); None: the methods estimate it from the data
    (:func:`recon_server.recon.noise.noise_level`).
    """

    kspace: Tensor
    maps: Tensor
    mask: Tensor | np.ndarray
    acceleration: float = 1.0
    contrast: str = ""
    noise_sigma: float | None = None


class ReconMethod(Protocol):
    """A reconstruction: problem -> complex images ``(slices, ky, kx)``."""

    def __call__(self, problem: ReconProblem) -> Tensor: ...


def _zero_filled(problem: ReconProblem) -> Tensor:
    return zero_filled(problem.kspace, problem.maps)


def _cg_sense(problem: ReconProblem) -> Tensor:
    return cg_sense(problem.kspace, problem.maps, problem.mask, noise_sigma=problem.noise_sigma)


def _l1_wavelet(problem: ReconProblem) -> Tensor:
    return l1_wavelet(problem.kspace, problem.maps, problem.mask, noise_sigma=problem.noise_sigma)


@dataclass
class MethodOutput:
    """What a method made: the image, an optional SD map (several posterior samples), provenance.

    image: complex ``(slices, ky, kx)`` in data units; std: float ``(slices, ky, kx)`` or None.
    """

    image: Tensor
    std: Tensor | None = None
    settings: dict[str, object] = field(default_factory=dict)
    model_name: str = ""
    model_version: str = ""


#: ``progress(done, total)``: items (posterior sample x slice) reconstructed so far.
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class DiffusionSettings:
    """Settings of the diffusion methods, passed with each call (module docstring).

    ``model_dir`` None -> env / default (module docstring); ``denoiser``: a preloaded denoiser
    object (same call signature as ``EDMDenoiser``) used instead of loading ``model_dir``;
    ``device`` None -> the device of the problem's tensors; ``overrides``: per method name,
    sampler settings that beat the card (e.g. ``{"dps": {"steps": 100}}``).
    """

    model_dir: Path | None = None
    denoiser: Any = None
    samples: int = 1
    seed: int = 0
    batch_size: int | None = None
    amp: bool = True
    cpu_precision: str = "auto"  # CPU arithmetic of the network (engine.bind_denoiser)
    device: str | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def model_directory(self) -> Path:
        """``$RECON_SERVER_MODEL_DIR``, else ``model_dir``, else :data:`DEFAULT_MODEL_DIR`."""
        env = os.environ.get(MODEL_DIR_ENV, "").strip()
        if env:
            return Path(env)
        return Path(self.model_dir) if self.model_dir is not None else DEFAULT_MODEL_DIR


def nearest_acceleration(table: dict[Any, Any], acceleration: float) -> Any:
    """The value whose acceleration key is nearest to ``acceleration`` in log R (ties: larger R)."""
    entries = [(float(k), v) for k, v in table.items()]
    if not entries:
        raise ValueError("empty per-acceleration table")
    r = max(float(acceleration), 1.0)
    return min(entries, key=lambda kv: (abs(math.log(kv[0] / r)), -kv[0]))[1]


def pick_by_acceleration(table: dict[Any, Any], acceleration: float) -> float:
    """The number whose acceleration key is nearest to ``acceleration`` (:func:`nearest_acceleration`)."""
    return float(nearest_acceleration(table, acceleration))


class DiffusionMethod:
    """A diffusion reconstruction method of the registry (module docstring).

    ``kind``: ``"dps"`` or ``"dds"``; ``warm_sigma``: warm start from CG-SENSE at that sigma;
    ``card_key``: the section of ``sampler_defaults`` with its steps / per-R weights.
    """

    needs_model = True

    def __init__(self, name: str, *, kind: str, steps: int, warm_sigma: float | None = None) -> None:
        self.name = name
        self.kind = kind
        self.default_steps = steps
        self.warm_sigma = warm_sigma

    def spec(self, card: Any, acceleration: float, overrides: dict[str, dict[str, Any]] | None = None) -> Any:
        """``(SamplerSpec, tuned)`` for a model card (None: fallbacks) and an acceleration R;
        ``overrides[name]`` beats the card."""
        overrides = overrides or {}
        from recon_server.recon.engine import SamplerSpec

        defaults = dict(getattr(card, "sampler_defaults", {}) or {})
        dps = dict(defaults.get("dps", {}))
        section = dict(defaults.get(self.name.replace("-", "_"), {})) if self.name != "dps" else dps
        kw: dict[str, Any] = {
            "kind": self.kind,
            "steps": int(section.get("steps", self.default_steps)),
            "sigma_min": float(dps.get("sigma_min", 0.004)),
            "sigma_max": float(dps.get("sigma_max", 10.0)),
            "rho": float(dps.get("rho", 7.0)),
            "warm_sigma": section.get("warm_sigma", self.warm_sigma),
        }
        if self.kind == "dps":
            tuned = bool(defaults.get("tuned", False))
            table = defaults.get("zeta_per_acceleration") if tuned else None
            kw["zeta"] = pick_by_acceleration(table or FALLBACK_ZETA, acceleration)
        else:
            tuned = bool(section.get("tuned", False))
            table = section.get("gamma_per_acceleration") if tuned else None
            kw["gamma"] = pick_by_acceleration(table or FALLBACK_GAMMA, acceleration)
            for key in ("cg_iters", "eta", "data_weight", "warm_start", "renoise"):
                if key in section:
                    kw[key] = section[key]
            if tuned and section.get("per_acceleration"):  # a whole schedule per R (tune_sampler.py)
                kw.update(nearest_acceleration(section["per_acceleration"], acceleration))
        kw.update(overrides.get(self.name, {}))
        return SamplerSpec(**kw), tuned

    def detailed(
        self,
        problem: ReconProblem,
        *,
        samples: int | None = None,
        diffusion: DiffusionSettings | None = None,
        progress: ProgressFn | None = None,
    ) -> MethodOutput:
        """Reconstruct with the model ``diffusion`` names; the SD map when ``samples`` > 1."""
        from recon_server.recon.engine import load_model, reconstruct_volume, select_device

        settings = diffusion or DiffusionSettings()
        model_dir = settings.model_directory()
        device = select_device(settings.device or problem.kspace.device)
        card: Any = None
        denoiser = settings.denoiser
        if denoiser is None:
            denoiser, card = load_model(model_dir, device)
        elif (model_dir / "card.json").is_file():  # injected denoiser: settings from its card
            from recon_server.dpm.checkpoint import read_card

            card = read_card(model_dir)
        if self.kind == "dps" and not isinstance(denoiser, torch.nn.Module):
            raise ValueError(
                f"method {self.name!r} backpropagates through the network: it needs the torch backend"
            )
        if not problem.contrast:
            raise ValueError(f"method {self.name!r} needs the scan's contrast (none in the header)")
        spec, tuned = self.spec(card, problem.acceleration, settings.overrides)
        n = settings.samples if samples is None else samples
        result = reconstruct_volume(
            denoiser,
            problem.contrast,
            problem.kspace,
            problem.maps,
            problem.mask,
            spec,
            samples=n,
            seed=settings.seed,
            batch_size=settings.batch_size,
            device=device,
            amp=settings.amp,
            noise_sigma=problem.noise_sigma,
            cpu_precision=settings.cpu_precision,
            progress=progress,
        )
        return MethodOutput(
            image=result.image.to(problem.kspace.device),
            std=None if result.std is None else result.std.to(problem.kspace.device),
            settings={**result.settings, "weights_tuned": tuned},
            model_name=str(getattr(card, "name", "") or type(denoiser).__name__),
            model_version=str(getattr(card, "version", "")),
        )

    def __call__(self, problem: ReconProblem) -> Tensor:
        return self.detailed(problem).image


METHODS: dict[str, ReconMethod] = {
    "zero-filled": _zero_filled,
    "cg-sense": _cg_sense,
    "l1-wavelet": _l1_wavelet,
    "dps": DiffusionMethod("dps", kind="dps", steps=500),
    "dps-fast": DiffusionMethod("dps-fast", kind="dds", steps=30),
    "dps-warm": DiffusionMethod("dps-warm", kind="dds", steps=10, warm_sigma=1.0),
}


def run_method(
    name: str,
    problem: ReconProblem,
    *,
    samples: int | None = None,
    diffusion: DiffusionSettings | None = None,
    progress: ProgressFn | None = None,
) -> MethodOutput:
    """Run a registered method; diffusion methods give provenance and (samples > 1) an SD map.

    ``diffusion``: the diffusion methods' settings (None: the defaults); ``samples=None`` takes
    its number of posterior samples. ``progress(done, total)`` is called as the items are done
    (once at the end for the classical methods, which run the volume at once).
    """
    method = get_method(name)
    if isinstance(method, DiffusionMethod):
        return method.detailed(problem, samples=samples, diffusion=diffusion, progress=progress)
    image = method(problem)
    if progress is not None:
        slices = int(problem.kspace.shape[0])
        progress(slices, slices)
    return MethodOutput(image=image)


def get_method(name: str) -> ReconMethod:
    """The registered method called ``name``; ValueError listing the known names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown reconstruction method {name!r}; known: {known}") from None
