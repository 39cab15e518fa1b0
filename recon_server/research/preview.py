"""PNG previews for people: tiles of magnitude images (simulator sheets, prior samples, demo).

:func:`magnitude_grid` + :func:`write_png`: bare tiles, written by Pillow (8-bit greyscale, grey
levels kept exactly). :func:`write_titled_sheet`: tiles with a title over each and one over the
sheet (matplotlib), for ``simulate --preview`` and the demo's ``preview.png``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def magnitude_grid(
    images: np.ndarray, *, columns: int | None = None, pad: int = 2, scale: str = "each"
) -> np.ndarray:
    """Tile magnitudes ``(n, H, W)`` into one uint8 image (0 = black border).

    ``scale="each"`` scales every tile to its own 99.5th percentile; ``"shared"`` uses the
    99.5th percentile of the first tile for all (so a reconstruction and its reference, or an
    error map, are shown on the same grey scale).
    """
    mags = np.abs(np.asarray(images))
    if mags.ndim != 3 or mags.shape[0] == 0:
        raise ValueError(f"expected images (n, H, W) with n >= 1, got shape {mags.shape}")
    n, h, w = mags.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.uint8)
    shared = float(np.percentile(mags[0], 99.5)) or 1.0
    for k in range(n):
        top = pad + (k // cols) * (h + pad)
        left = pad + (k % cols) * (w + pad)
        hi = shared if scale == "shared" else (float(np.percentile(mags[k], 99.5)) or 1.0)
        grid[top : top + h, left : left + w] = np.clip(mags[k] / hi * 255.0, 0, 255).astype(np.uint8)
    return grid


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write an 8-bit greyscale ``(H, W)`` image as a PNG (grey levels kept exactly); returns the path."""
    from PIL import Image

    img = np.asarray(image)
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 greyscale image, got {img.dtype} {img.shape}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(p)  # uint8 (H, W) -> mode "L"
    return p


@dataclass(frozen=True)
class Panel:
    """One tile of :func:`write_titled_sheet`: a magnitude image, its title, and the grey level
    shown white (None: the image's own 99.5th percentile)."""

    image: np.ndarray
    title: str
    vmax: float | None = None


def write_titled_sheet(
    path: str | os.PathLike[str],
    panels: Sequence[Panel],
    *,
    columns: int,
    title: str,
    tile_inches: float = 3.0,
    dpi: int = 80,
) -> Path:
    """PNG contact sheet: ``panels`` row by row in ``columns`` columns on black, white titles;
    returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels or columns < 1:
        raise ValueError(f"expected panels and columns >= 1, got {len(panels)} panels, {columns} columns")
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(tile_inches * columns, tile_inches * rows + 0.4),
        facecolor="black",
        squeeze=False,
    )
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(panels):
            continue
        panel = panels[k]
        image = np.abs(np.asarray(panel.image))
        vmax = panel.vmax if panel.vmax is not None else float(np.percentile(image, 99.5))
        ax.imshow(image, cmap="gray", vmin=0, vmax=vmax or 1.0)
        ax.set_title(panel.title, color="white", fontsize=10)
    fig.suptitle(title, color="white")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, facecolor="black", metadata={"Software": "recon-server"})
    plt.close(fig)
    return out
