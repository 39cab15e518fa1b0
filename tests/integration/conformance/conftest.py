"""The conformance corpus: one simulated subject written in every acquisition convention."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from recon_server.data.acquire import SimulatedSubject, SimulationConfig, simulate_subject
from recon_server.recon import methods
from recon_server.service.config import ServiceConfig
from recon_server.service.server import StreamServer
from recon_server.service.worker import ReconWorker


def _load_corpus() -> ModuleType:
    """corpus.py by path (with --import-mode=importlib the test folders are not packages)."""
    name = "recon_conformance_corpus"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "corpus.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


corpus = _load_corpus()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``case``: every convention of the corpus with calibration data (the file without any has
    other expectations: test_no_calibration_at_all)."""
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", [name for name in corpus.CASES if name != "no-calibration"])


SHIPPED_MODEL = Path(__file__).resolve().parents[3] / "models" / "flair-stroke-demo"
# Few steps keep the faithful sampler affordable in `make test`; bounds below are for these. The
# fast sampler's whole schedule is pinned: the card's is chosen by the scan's effective
# acceleration, and the tests compare files that differ in it (the calibration lines).
FAST_SCHEDULE = {
    "warm_start": "cg-sense",
    "warm_sigma": 0.3,
    "data_weight": 1.0,
    "renoise": False,
    "eta": 0.0,
}
DIFFUSION_STEPS = {
    "dps": {"steps": 24},
    "dps-fast": {"steps": 10, "sigma_min": 0.02, **FAST_SCHEDULE},
    "dps-warm": {"steps": 4},
}


@pytest.fixture(scope="session")
def layouts() -> ModuleType:
    return corpus


@pytest.fixture(scope="session")
def subject() -> SimulatedSubject:
    """A 96x96 two-slice FLAIR subject, 8 coils (seed never used for training or tuning)."""
    return simulate_subject(SimulationConfig(matrix=96, slices=2, coils=8, acceleration=4), seed=71, index=0)


@pytest.fixture(scope="session")
def truth(subject: SimulatedSubject) -> tuple[np.ndarray, np.ndarray]:
    """(the noiseless reference (slices, ny, nx), head mask): |truth| x the prewhitened coil
    weighting, what the data determine (``recon_server.research.evaluate``)."""
    assert subject.coil_weight is not None
    mag = np.abs(subject.truth) * subject.coil_weight
    return mag, mag > 0.1 * mag.max()


@pytest.fixture(scope="session")
def corpus_files(subject: SimulatedSubject, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("corpus")
    return {
        name: corpus.write_case(folder / f"{name}.h5", subject, layout(subject))
        for name, layout in corpus.CASES.items()
    }


@pytest.fixture(scope="session")
def diffusion_settings() -> methods.DiffusionSettings:
    """The shipped model with few steps."""
    return methods.DiffusionSettings(model_dir=SHIPPED_MODEL, overrides=DIFFUSION_STEPS)


@pytest.fixture(scope="session")
def recon_options() -> list[str]:
    """The same settings as ``recon`` options (``--model-dir``, ``--set METHOD.SETTING=VALUE``)."""
    argv = ["--model-dir", str(SHIPPED_MODEL)]
    for method, settings in DIFFUSION_STEPS.items():
        for name, value in settings.items():
            argv += ["--set", f"{method}.{name}={json.dumps(value)}"]
    return argv


@pytest.fixture(scope="module")
def server(diffusion_settings: methods.DiffusionSettings) -> Iterator[StreamServer]:
    # Every method through the server, faithful dps included (opt-in for clients: issue 14).
    config = ServiceConfig(
        port=0, default_method="cg-sense", socket_timeout_s=120, allowed_client_methods=("*",)
    )
    srv = StreamServer(config, worker=ReconWorker(diffusion=diffusion_settings))
    srv.start()
    yield srv
    srv.stop()
