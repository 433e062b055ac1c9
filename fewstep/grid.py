"""Sample grids as PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int | None = None) -> None:
    """Tile (N, C, H, W) images in [-1, 1] into a PNG, `nrow` per row, upscaled so small images stay visible."""
    images = images.detach().float().cpu().clamp(-1, 1)
    n, c, h, w = images.shape
    ncol = nrow
    nrows = (n + ncol - 1) // ncol
    scale = scale or max(1, 64 // max(h, w))
    canvas = torch.full((c, nrows * (h + 1) + 1, ncol * (w + 1) + 1), -1.0)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        canvas[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = img
    array = ((canvas + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    array = np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)
    mode = "L" if c == 1 else "RGB"
    Image.fromarray(array[..., 0] if c == 1 else array, mode=mode).save(path)
