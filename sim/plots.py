"""Image grids and figures written with matplotlib (Agg backend, files only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def image_grid(images: np.ndarray, ncol: int, pad: int = 1, fill: int = 255) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images into one (rows*H, ncol*W, 3) array with ``pad`` px gaps."""
    n, h, w, c = images.shape
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid


def save_image_grid(images: np.ndarray, path: str | Path, ncol: int = 8, scale: int = 4) -> Path:
    """Save a grid PNG, upscaled ``scale`` x with nearest neighbour so small images stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = image_grid(np.asarray(images), ncol)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid)
    return path


def save_rows_grid(rows: dict[str, np.ndarray], path: str | Path, scale: int = 4, title: str | None = None) -> Path:
    """One labelled row per entry (e.g. condition | generated | target), same number of images each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    ncol = min(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(names), 1, figsize=(ncol * 0.6 + 1.5, len(names) * 0.75 + 0.4), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        ax.imshow(image_grid(np.asarray(rows[name][:ncol]), ncol), interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
