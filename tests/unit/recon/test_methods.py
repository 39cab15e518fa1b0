"""The method registry."""

from __future__ import annotations

import pytest
import torch

from recon_server.recon.masks import equispaced_mask, mask_2d
from recon_server.recon.methods import METHODS, ReconProblem, get_method


def test_registry_names_and_errors() -> None:
    assert {"zero-filled", "cg-sense", "l1-wavelet"} <= set(METHODS)
    assert get_method("cg-sense") is METHODS["cg-sense"]
    with pytest.raises(
        ValueError, match="unknown reconstruction method 'dps-x'.*cg-sense.*l1-wavelet.*zero-filled"
    ):
        get_method("dps-x")


@pytest.mark.parametrize("name", ["zero-filled", "cg-sense", "l1-wavelet"])
def test_methods_run_on_a_problem(name: str, case_factory) -> None:
    case = case_factory(32, 4, 2, noise=0.01, seed=4)
    mask = mask_2d(
        equispaced_mask(32, 2, offset=0, center_fraction=0.25), 32
    )  # numpy mask, as the assembler gives
    problem = ReconProblem(
        kspace=case.full * torch.from_numpy(mask), maps=case.maps, mask=mask, acceleration=2.0
    )
    assert problem.contrast == ""
    out = get_method(name)(problem)
    assert out.shape == (2, 32, 32) and out.dtype == torch.complex64
    err = float((out.abs() - case.image.abs()).norm() / case.image.abs().norm())
    assert err < 0.5
