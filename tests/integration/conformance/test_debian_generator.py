"""Files of Debian's ``ismrmrd_generate_cartesian_shepp_logan`` (interleaved calibration lines,
2x readout oversampling, a noise scan, repetitions) through `serve` + `replay` and `recon`, every
method, against the phantom the generator stores beside the raw data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from recon_server.cli import main as cli
from recon_server.mrd import ismrmrd_io
from recon_server.mrd.replay import stream_scan
from recon_server.research.quality import nrmse
from recon_server.service.server import StreamServer

METHODS = ("zero-filled", "cg-sense", "l1-wavelet", "dps", "dps-fast", "dps-warm")
# Measured here with margin (full / 2x: cg-sense 0.132 / 0.173, l1-wavelet 0.130 / 0.155, dps-fast
# 0.132 / 0.169, dps-warm 0.132 / 0.184, dps with 24 steps 0.40 / 0.43); the generator's noise
# level 0.05 costs 0.165 even with its true coil maps. The FLAIR prior never saw a phantom. The
# shipped CPU prior's dps-fast: 0.218-0.243 / 0.253: its schedule ends at sigma 0.02 while this
# file's noise is sigma_y 0.12 in the sampler's units (6x the simulator's), so the last steps trust
# a denoiser that removes less noise than there is (sigma_min 0.05 / 0.1 / 0.2 -> 0.207 / 0.162 /
# 0.138 on shepp_full): a schedule that follows the data's noise level is the open fix (issue 15).
NRMSE_BOUND = {
    "zero-filled": 0.35,
    "cg-sense": 0.21,
    "l1-wavelet": 0.19,
    "dps": 0.50,
    "dps-fast": 0.28,
    "dps-warm": 0.22,
}


def _errors(images: np.ndarray, phantom: np.ndarray) -> list[float]:
    head = phantom > 0.05 * phantom.max()
    return [nrmse(image, phantom, mask=head, fit_scale=True) for image in images]


@pytest.mark.parametrize("fixture", ["shepp_full", "shepp_accel2"])
def test_generator_files_every_method_through_serve_and_recon(
    fixture: str,
    request: pytest.FixtureRequest,
    shepp_truth: Callable[[Path], tuple[np.ndarray, np.ndarray]],
    server: StreamServer,
    recon_options: list[str],
    tmp_path: Path,
) -> None:
    path: Path = request.getfixturevalue(fixture)
    phantom, _ = shepp_truth(path)
    raw = ismrmrd_io.read_raw(path)
    repetitions = 1 if fixture == "shepp_full" else 2
    assert server.address is not None
    for method in METHODS:
        # The generator's header names no contrast: the client says which prior to use.
        result = stream_scan(
            raw,
            host=server.address[0],
            port=server.address[1],
            options={"method": method, "contrast": "FLAIR"},
            progress=False,
            timeout_s=120,
        )
        assert not result.errors, (fixture, method, result.errors)
        served = result.magnitude()
        assert served.shape == (repetitions, 64, 64)
        assert max(_errors(served, phantom)) < NRMSE_BOUND[method], (
            fixture,
            method,
            _errors(served, phantom),
        )
        out = tmp_path / f"{fixture}-{method}"
        # the server's diffusion settings (the shipped model, few steps) as recon options
        argv = ["recon", str(path), "--out", str(out), "--method", method, "--contrast", "FLAIR"]
        argv += recon_options
        assert cli.main(argv) == 0
        recon = np.load(out / "images.npy")
        np.testing.assert_allclose(recon, served, rtol=1e-4, atol=1e-3 * float(served.max()))
