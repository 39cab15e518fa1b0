"""Posterior samplers with a diffusion prior: faithful DPS and two fast samplers without backprop.

All samplers are pure functions ``sampler(denoise, forward_op, y, *, steps, ..., generator)``:

- ``denoise(x, sigma) -> x0_hat``: the EDM denoiser with the contrast already bound (any backend:
  torch :class:`~recon_server.dpm.unet.EDMDenoiser`, the ONNX Runtime denoiser, or a test
  stand-in); ``x`` float32 ``(B, 2, H, W)`` = (real, imag) of the scale-normalised complex image,
  ``sigma`` float32 ``(B,)``. Only :func:`dps_sample` differentiates through it.
- ``forward_op``: the forward model on complex images ``(B, H, W)`` with ``forward``, ``adjoint``
  and ``normal`` (e.g. :class:`~recon_server.recon.sense.SenseOperator`; this module never imports
  it). ``y``: measured k-space in the same normalised units, ``forward_op.forward(x_true) ~ y``.
- ``generator``: one ``torch.Generator`` or one per batch item (then every item's noise depends on
  its own generator only, so results do not depend on how slices are batched).

Schedule: :func:`recon_server.dpm.edm.edm_sigmas` (float64, rho 7), cast per step.

**DPS** (:func:`dps_sample`, Chung et al. 2023 as run by the paper, Euler on the EDM ODE)::

    x = s_0 n                                  (or init + s_0 n for a warm start)
    for i in 0 .. N-1:
        x0 = D(x, s_i)                         keep the graph
        r  = y - A x0                          per item
        g  = grad_x ||r||^2                    backprop through the network
        x  = x + (s_{i+1} - s_i) (x - x0) / s_i  -  zeta g / max(||r||, guard zeta)

The guard: with ``J = dx0/dx ~ I`` at low sigma and ``||A^H A|| <= 1`` (unit-norm coil maps), the
data step lowers ``||r||`` by up to ``2 zeta`` per step whatever ``||r||`` is, so once ``||r||``
falls below ``~zeta`` (noiseless data) it overshoots and oscillates. Dividing by
``max(||r||, guard zeta)`` turns the step into plain gradient descent with step ``1/guard`` on
``||r||^2`` there, monotone for ``guard >= 1`` (default 2). With noisy data ``||r||`` stays near the
noise norm, far above ``zeta``, and the guard never acts. ``solver="heun"`` averages the prior
slopes at ``x_i`` and the Euler prediction (one extra network call without graph).

**DDS** (:func:`dds_sample`, decomposed diffusion sampling, Chung et al. 2024; no backprop)::

    x = s_0 n                                  (or init + s_0 n)
    for i in 0 .. N-1:
        x0 = D(x, s_i)                         no graph
        g  = gamma + lambda (sigma_y / s_i)^2  (noise-calibrated weight; lambda = 0: constant)
        z  = CG_k on (A^H A + g I) z = A^H y + g x0, started at x0
        eps = (x - x0) / s_i                   the denoiser's noise estimate
        c   = eta s_{i+1} sqrt(1 - s_{i+1}^2 / s_i^2)
        x  = z + sqrt(s_{i+1}^2 - c^2) eps + c n        (DDIM re-noising; = z at s_N = 0)

The noise-calibrated weight: with ``x0`` an estimate whose error has about the size ``s_i`` of
the noise it was denoised from, and k-space noise ``sigma_y`` per sample (normalised units, 1 /
scale after prewhitening), the MAP combination of the data and ``x0`` on the sampled k-space is
``(A^H A + (sigma_y / s_i)^2 I) z = A^H y + (sigma_y / s_i)^2 x0``: early (``s_i >> sigma_y``) the
data win, late (``s_i < sigma_y``) the denoised image does, so the sampler also removes the thermal
noise that CG-SENSE keeps. ``lambda`` (``data_weight``) corrects for the denoiser's error being
smaller than ``s_i`` (tuned per model, in its card); ``gamma`` is a small floor.

Support: pixels that no coil sees (ESPIRiT maps are zero there) are in the null space of ``A``,
so the data never corrects them and the prior's texture would stay in the background (CG-SENSE
leaves them at zero). With ``support`` (bool ``(B, H, W)``, e.g. ``sum_c |S_c|^2 > 0``) both
samplers zero ``x0`` outside it after every network call and return an image that is zero there.

Both samplers count network evaluations per batch item (``nfe``) in their :class:`SampleResult`.
A warm start (``init`` and a small ``sigma_max``, e.g. CG-SENSE noised to ``s = 1``) runs only the
end of the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from recon_server.dpm.edm import DEFAULT_RHO, DEFAULT_SIGMA_MAX, DEFAULT_SIGMA_MIN, edm_sigmas
from recon_server.recon.classic import conjugate_gradient

__all__ = [
    "DenoiseFn",
    "ForwardModel",
    "SampleResult",
    "SamplingStopped",
    "check_stop",
    "dds_sample",
    "dps_sample",
    "dps_step",
    "randn",
    "residual_norm",
    "stop_check",
    "to_channels",
    "to_complex",
]

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
"""``denoise(x (B, 2, H, W) float32, sigma (B,) float32) -> x0_hat (B, 2, H, W)``, contrast bound."""

Generators = torch.Generator | Sequence[torch.Generator] | None


class ForwardModel(Protocol):
    """What the samplers need of the forward model ``A`` (complex images ``(B, H, W)``)."""

    def forward(self, x: Tensor) -> Tensor: ...

    def adjoint(self, y: Tensor) -> Tensor: ...

    def normal(self, x: Tensor) -> Tensor: ...


@dataclass
class SampleResult:
    """One sampler run on a batch.

    image:    complex64 ``(B, H, W)`` in the normalised units of ``y``.
    nfe:      network evaluations per batch item (one call on the batch counts once).
    backprops: of which with a backward pass through the network (DPS only).
    residual: ``||A x - y|| / ||y||`` per item at the end, float ``(B,)``.
    settings: the sampler's settings (for the provenance).
    """

    image: Tensor
    nfe: int
    backprops: int
    residual: Tensor
    settings: dict[str, object] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def to_complex(x: Tensor) -> Tensor:
    """``(B, 2, H, W)`` real -> complex64 ``(B, H, W)``."""
    return torch.complex(x[:, 0].float(), x[:, 1].float())


def to_channels(z: Tensor) -> Tensor:
    """complex ``(B, H, W)`` -> float32 ``(B, 2, H, W)`` (real, imag)."""
    return torch.stack([z.real, z.imag], dim=1).float()


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device) -> Tensor:
    """Standard normal float32 draws of ``shape``; item ``b`` from ``generator[b]`` when a list.

    Drawn on the generators' device (CPU generators give identical numbers for CPU and CUDA runs)
    and moved to ``device``.
    """
    if generator is None or isinstance(generator, torch.Generator):
        gdev = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(device)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"{len(gens)} generators for a batch of {shape[0]}")
    parts = [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in gens]
    return torch.stack(parts).to(device)


def _item_norm(v: Tensor) -> Tensor:
    """Per-item 2-norm over all but the first axis, float32 ``(B,)``."""
    return torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1).float()


def residual_norm(forward_op: ForwardModel, x: Tensor, y: Tensor) -> Tensor:
    """``||A x - y|| / ||y||`` per item for a complex image ``x`` ``(B, H, W)``."""
    return _item_norm(forward_op.forward(x) - y) / _item_norm(y).clamp_min(1e-30)


def _check(y: Tensor, steps: int, init: Tensor | None) -> None:
    if y.ndim < 3 or y.shape[0] < 1:
        raise ValueError(f"y must be k-space (B, ...) with B >= 1, got shape {tuple(y.shape)}")
    if not bool(torch.isfinite(torch.view_as_real(y) if y.is_complex() else y).all()):
        raise ValueError("k-space contains NaN or inf")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if init is not None and (init.ndim != 3 or init.shape[0] != y.shape[0]):
        raise ValueError(f"init must be complex (B, H, W) with B = {y.shape[0]}, got {tuple(init.shape)}")


def _restrict(x0: Tensor, support: Tensor | None) -> Tensor:
    """``x0`` (channels ``(B, 2, H, W)`` or complex ``(B, H, W)``) set to zero outside ``support``."""
    if support is None:
        return x0
    keep = support.to(device=x0.device, dtype=torch.float32)
    return x0 * (keep[:, None] if x0.ndim == 4 else keep)


def _start(
    y: Tensor,
    forward_op: ForwardModel,
    init: Tensor | None,
    sigma0: float,
    generator: Generators,
    support: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``(x_0, A^H y)``: ``x_0 = init + s_0 n`` in channel form (``init`` = 0 for a cold start);
    the adjoint gives the image shape (``support`` is checked against it) and DDS reuses it."""
    aty = forward_op.adjoint(y)
    b, h, w = aty.shape
    if support is not None and tuple(support.shape) != (b, h, w):
        raise ValueError(f"support must be (B, H, W) = {(b, h, w)}, got {tuple(support.shape)}")
    noise = randn((b, 2, h, w), generator, y.device)
    base = to_channels(init) if init is not None else torch.zeros_like(noise)
    return base + sigma0 * noise, aty


# --------------------------------------------------------------------------- DPS


def dps_step(
    denoise: DenoiseFn,
    forward_op: ForwardModel,
    y: Tensor,
    x: Tensor,
    sigma: float,
    sigma_next: float,
    *,
    zeta: float,
    guard: float = 2.0,
    solver: str = "euler",
    support: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """One DPS step (module docstring) from ``x`` at ``sigma`` to ``sigma_next``.

    Returns ``(x_next, x0_hat, ||r||, network evaluations)``; ``||r||`` per item, before the step.
    """
    b = x.shape[0]
    s = torch.full((b,), sigma, dtype=torch.float32, device=x.device)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        x0 = _restrict(denoise(xg, s).float(), support)
        r = y - forward_op.forward(to_complex(x0))
        rn = _item_norm(torch.view_as_real(r))
        # grad of ||r||^2 / max(||r||, guard zeta) with the denominator held fixed (per item).
        denom = torch.clamp(rn.detach(), min=guard * zeta if zeta > 0 else 1e-30)
        loss = (rn.square() / denom).sum()
        grad = torch.zeros_like(xg)
        if zeta > 0 and loss.requires_grad:  # a denoiser that ignores x (an oracle) has no gradient
            (g,) = torch.autograd.grad(loss, xg, allow_unused=True)
            grad = g if g is not None else grad
    x0 = x0.detach()
    d = (x - x0) / sigma
    x_next = x + (sigma_next - sigma) * d
    nfe = 1
    if solver == "heun" and sigma_next > 0:
        s2 = torch.full((b,), sigma_next, dtype=torch.float32, device=x.device)
        with torch.no_grad():
            d2 = (x_next - _restrict(denoise(x_next, s2).float(), support)) / sigma_next
        x_next = x + (sigma_next - sigma) * 0.5 * (d + d2)
        nfe += 1
    return (x_next - zeta * grad).detach(), x0, rn.detach(), nfe


def dps_sample(
    denoise: DenoiseFn,
    forward_op: ForwardModel,
    y: Tensor,
    *,
    steps: int = 500,
    zeta: float = 1.0,
    generator: Generators = None,
    sigma_min: float = DEFAULT_SIGMA_MIN,
    sigma_max: float = DEFAULT_SIGMA_MAX,
    rho: float = DEFAULT_RHO,
    solver: str = "euler",
    guard: float = 2.0,
    init: Tensor | None = None,
    support: Tensor | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> SampleResult:
    """Diffusion posterior sampling with the gradient through the network (module docstring).

    ``zeta`` >= 0 is the data-consistency weight; ``guard`` the residual floor in units of zeta;
    ``init`` (complex ``(B, H, W)``, normalised) starts from ``init + sigma_max n`` (warm start).
    ``support`` as in the module docstring. ``callback(i, x0_hat, ||r||)`` after each step.
    Returns a :class:`SampleResult`.
    """
    _check(y, steps, init)
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    if zeta < 0 or guard <= 0:
        raise ValueError(f"need zeta >= 0 and guard > 0, got zeta={zeta}, guard={guard}")
    sigmas = edm_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    x, _ = _start(y, forward_op, init, float(sigmas[0]), generator, support)
    nfe = 0
    for i in range(steps):
        check_stop()
        x, x0, rn, n = dps_step(
            denoise,
            forward_op,
            y,
            x,
            float(sigmas[i]),
            float(sigmas[i + 1]),
            zeta=zeta,
            guard=guard,
            solver=solver,
            support=support,
        )
        nfe += n
        if callback is not None:
            callback(i, x0, rn)
    image = _restrict(to_complex(x), support)
    settings: dict[str, object] = {
        "sampler": "dps",
        "solver": solver,
        "steps": steps,
        "zeta": zeta,
        "guard": guard,
        "sigma_min": sigma_min,
        "sigma_max": sigma_max,
        "rho": rho,
        "warm_start": init is not None,
    }
    return SampleResult(image, nfe, steps, residual_norm(forward_op, image, y), settings)


# --------------------------------------------------------------------------- DDS


def dds_sample(
    denoise: DenoiseFn,
    forward_op: ForwardModel,
    y: Tensor,
    *,
    steps: int = 30,
    gamma: float = 0.05,
    cg_iters: int = 5,
    eta: float = 0.85,
    generator: Generators = None,
    sigma_min: float = DEFAULT_SIGMA_MIN,
    sigma_max: float = DEFAULT_SIGMA_MAX,
    rho: float = DEFAULT_RHO,
    init: Tensor | None = None,
    support: Tensor | None = None,
    noise_sigma: Tensor | None = None,
    data_weight: float = 0.0,
    renoise: bool = True,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> SampleResult:
    """Decomposed diffusion sampling: denoise, a few CG data-consistency iterations, re-noise.

    ``renoise`` False skips the DDIM re-noising (``x = z``): the next step denoises the data-
    consistent image itself, treating its remaining error as noise of level ``s_{i+1}``
    (plug-and-play half-quadratic splitting as in DPIR, with the same noise-calibrated weight);
    a warm start is then used as it is (no noise added: its own error is the noise of ``s_0``).
    ``gamma`` > 0 weights the proximity to the denoised image in the CG system (smaller = closer to
    the data); ``noise_sigma`` (B,) the k-space noise per sample in the units of ``y`` and
    ``data_weight`` (lambda) >= 0 add ``lambda (noise_sigma / s_i)^2`` to it (module docstring);
    ``cg_iters`` CG iterations per step, one system per item; ``eta`` in [0, 1] the DDIM
    stochasticity (0 deterministic). ``init``/``sigma_max``/``support`` as in :func:`dps_sample`.
    ``callback(i, z, ||A z - y|| / ||y||)`` after each step. No gradient through the network.
    """
    _check(y, steps, init)
    if gamma <= 0 or cg_iters < 0 or not 0.0 <= eta <= 1.0 or data_weight < 0:
        raise ValueError(
            f"need gamma > 0, cg_iters >= 0, 0 <= eta <= 1, data_weight >= 0; "
            f"got {gamma}, {cg_iters}, {eta}, {data_weight}"
        )
    if data_weight > 0 and (noise_sigma is None or noise_sigma.shape != (y.shape[0],)):
        raise ValueError(f"data_weight > 0 needs noise_sigma of shape ({y.shape[0]},)")
    sigmas = edm_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    with torch.no_grad():
        # Plug-and-play from a warm start: the start image's own error is the "noise" of level s_0.
        start_noise = 0.0 if (not renoise and init is not None) else float(sigmas[0])
        x, aty = _start(y, forward_op, init, start_noise, generator, support)
        b = x.shape[0]
        z = to_complex(x)
        for i in range(steps):
            check_stop()
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            x0 = denoise(x, torch.full((b,), s, dtype=torch.float32, device=x.device)).float()
            x0 = _restrict(x0, support)
            weight = _proximity_weight(gamma, data_weight, noise_sigma, s, x.device)
            z = _data_consistent(forward_op, aty, to_complex(x0), weight, cg_iters)
            if callback is not None:
                callback(i, z, residual_norm(forward_op, z, y))
            if s_next <= 0:
                break
            x = _ddim_renoise(x, x0, z, s, s_next, eta, generator) if renoise else to_channels(z)
    z = _restrict(z, support)
    settings: dict[str, object] = {
        "sampler": "dds",
        "steps": steps,
        "gamma": gamma,
        "data_weight": data_weight,
        "renoise": renoise,
        "cg_iters": cg_iters,
        "eta": eta,
        "sigma_min": sigma_min,
        "sigma_max": sigma_max,
        "rho": rho,
        "warm_start": init is not None,
    }
    return SampleResult(z, steps, 0, residual_norm(forward_op, z, y), settings)


def _proximity_weight(
    gamma: float, data_weight: float, noise_sigma: Tensor | None, s: float, device: torch.device
) -> float | Tensor:
    """DDS's weight on the denoised image: ``gamma``, plus ``lambda (noise_sigma / s)^2`` per item."""
    if data_weight > 0 and noise_sigma is not None:
        return gamma + data_weight * (noise_sigma.to(device).reshape(-1, 1, 1) / s) ** 2
    return gamma


def _data_consistent(
    forward_op: ForwardModel, aty: Tensor, x0c: Tensor, weight: float | Tensor, cg_iters: int
) -> Tensor:
    """``cg_iters`` CG iterations on ``(A^H A + weight) z = A^H y + weight x0``, started at ``x0``."""

    def system(v: Tensor) -> Tensor:
        return forward_op.normal(v) + weight * v

    return conjugate_gradient(system, aty + weight * x0c, iters=cg_iters, tol=1e-7, x0=x0c, dims=(-2, -1))


def _ddim_renoise(
    x: Tensor, x0: Tensor, z: Tensor, s: float, s_next: float, eta: float, generator: Generators
) -> Tensor:
    """DDIM from level ``s`` to ``s_next`` around the data-consistent ``z``; ``eta`` scales fresh noise."""
    eps = (x - x0) / s
    c = eta * s_next * math.sqrt(max(0.0, 1.0 - (s_next / s) ** 2))
    noise = randn(tuple(x.shape), generator, x.device) if c > 0 else torch.zeros_like(x)
    return to_channels(z) + math.sqrt(max(s_next**2 - c**2, 0.0)) * eps + c * noise


# --------------------------------------------------------------------------- stopping


class SamplingStopped(TimeoutError):
    """A sampler stopped between two steps because its stop check said so (e.g. a time limit)."""


_STOP_CHECK: ContextVar[Callable[[], None] | None] = ContextVar("recon_server_stop_check", default=None)


@contextmanager
def stop_check(check: Callable[[], None] | None) -> Iterator[None]:
    """Samplers run in this context call ``check()`` before every step; it raises to stop them
    (:class:`SamplingStopped` or a subclass for a time limit; the caller's own exception for a
    cancellation). The reconstruction worker sets it per job (``pipeline``)."""
    token = _STOP_CHECK.set(check)
    try:
        yield
    finally:
        _STOP_CHECK.reset(token)


def check_stop() -> None:
    """Call the context's stop check, if any (see :func:`stop_check`)."""
    check = _STOP_CHECK.get()
    if check is not None:
        check()
