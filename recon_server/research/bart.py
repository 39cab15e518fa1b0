"""BART (Berkeley Advanced Reconstruction Toolbox) as an outside reference: files and ``pics`` runs.

BART has no Python binding here; it reads and writes ``.cfl`` (complex64 samples, column-major)
plus ``.hdr`` (``# Dimensions`` then 16 sizes) file pairs. Axis order used here for one 2-D
slice: ``(ky, kx, 1, coils)`` (BART dims 0, 1, 2 = spatial, 3 = coils), the layout the
benchmarks and the evaluation share. Only the Debian ``bart`` binary (0.8) is needed; nothing in
the service imports this module.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["bart_binary", "pics", "read_cfl", "write_cfl"]


def write_cfl(path: Path, array: np.ndarray) -> None:
    """BART ``.cfl``/``.hdr`` pair: complex64, column-major, dims padded to 16."""
    dims = list(array.shape) + [1] * (16 - array.ndim)
    path.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, dims)) + "\n")
    np.asfortranarray(array.astype(np.complex64)).ravel(order="F").tofile(path.with_suffix(".cfl"))


def read_cfl(path: Path) -> np.ndarray:
    """Read a ``.cfl``/``.hdr`` pair (trailing singleton dims kept, as BART writes them)."""
    dims = [int(d) for d in path.with_suffix(".hdr").read_text().splitlines()[1].split()]
    data = np.fromfile(path.with_suffix(".cfl"), dtype=np.complex64)
    return data.reshape(dims, order="F")


def bart_binary() -> str | None:
    """Path of the ``bart`` executable, or None when it is not installed."""
    return shutil.which("bart")


def pics(
    kspace: np.ndarray,
    *,
    calibration_rows: int,
    regularization: str = "W:3:0:0.005",
    iters: int = 50,
    maps: np.ndarray | None = None,
) -> np.ndarray:
    """BART ``pics`` per slice: ``ecalib -m1 -r calibration_rows`` maps (or ``maps``), then
    ``pics -S -R regularization -i iters`` (``-S``: BART rescales to its own data scale).

    ``kspace`` complex ``(slices, coils, ky, kx)`` zero-filled; returns complex ``(slices, ky, kx)``.
    """
    bart = bart_binary()
    if bart is None:
        raise FileNotFoundError("bart not installed (Debian package bart)")
    out = []
    with tempfile.TemporaryDirectory(prefix="recon-bart-") as tmp:
        d = Path(tmp)
        for s in range(kspace.shape[0]):
            write_cfl(d / "ksp", np.transpose(kspace[s], (1, 2, 0))[:, :, None, :])
            if maps is None:
                cmd = [bart, "ecalib", "-m1", "-r", str(calibration_rows), str(d / "ksp"), str(d / "sens")]
                subprocess.run(cmd, check=True, capture_output=True)
            else:
                write_cfl(d / "sens", np.transpose(maps[s], (1, 2, 0))[:, :, None, :])
            cmd = [bart, "pics", "-S", "-R", regularization, "-i", str(iters)]
            subprocess.run(
                [*cmd, str(d / "ksp"), str(d / "sens"), str(d / "img")], check=True, capture_output=True
            )
            out.append(read_cfl(d / "img").reshape(kspace.shape[-2], kspace.shape[-1]))
    return np.stack(out)
