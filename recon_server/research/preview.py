"""PNG previews for people: tiles of magnitude images (simulator sheets, prior samples, demo).

Pillow writes the files (8-bit greyscale, grey levels kept exactly).
"""

from __future__ import annotations

import math
import os
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
