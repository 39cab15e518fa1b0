"""Registry of reconstruction methods: name -> callable on a :class:`ReconProblem`.

Names are what configs, the CLI and the wire use (an explicit registry, never a module path).
The classical methods are registered here; the diffusion samplers ("dps", "dps-fast") add
themselves to :data:`METHODS` from their own module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from torch import Tensor

from recon_server.recon.classic import cg_sense, l1_wavelet, zero_filled

__all__ = ["METHODS", "ReconMethod", "ReconProblem", "get_method"]


@dataclass
class ReconProblem:
    """One batch of slices to reconstruct.

    kspace: complex64 ``(slices, coils, ky, kx)`` (prewhitened; zeros where not acquired).
    maps:   complex64 ``(slices, coils, ky, kx)`` coil sensitivities.
    mask:   bool/real ``(ky, kx)``, ``(slices, ky, kx)`` or ``(slices, 1, ky, kx)``.
    acceleration: nominal R (samplers may pick settings by it); contrast: label such as ``FLAIR``.
    """

    kspace: Tensor
    maps: Tensor
    mask: Tensor | np.ndarray
    acceleration: float = 1.0
    contrast: str = ""


class ReconMethod(Protocol):
    """A reconstruction: problem -> complex images ``(slices, ky, kx)``."""

    def __call__(self, problem: ReconProblem) -> Tensor: ...


def _zero_filled(problem: ReconProblem) -> Tensor:
    return zero_filled(problem.kspace, problem.maps)


def _cg_sense(problem: ReconProblem) -> Tensor:
    return cg_sense(problem.kspace, problem.maps, problem.mask)


def _l1_wavelet(problem: ReconProblem) -> Tensor:
    return l1_wavelet(problem.kspace, problem.maps, problem.mask)


METHODS: dict[str, ReconMethod] = {
    "zero-filled": _zero_filled,
    "cg-sense": _cg_sense,
    "l1-wavelet": _l1_wavelet,
}


def get_method(name: str) -> ReconMethod:
    """The registered method called ``name``; ValueError listing the known names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown reconstruction method {name!r}; known: {known}") from None
