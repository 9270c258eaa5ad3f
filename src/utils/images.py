"""Image grids and PNG writing for samples and figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difflab.ops.atomic import atomic_write


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255] (same shape)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def make_grid(images: torch.Tensor, nrow: int, pad: int = 1, pad_value: int = 0) -> np.ndarray:
    """N x C x H x W uint8 images -> H' x W' x C uint8 grid with ``nrow`` images per row."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = arr[i]
    return grid


def save_png(array: np.ndarray, path: str | Path, upscale: int = 1) -> Path:
    """Write an H x W x C (C = 1 or 3) uint8 array as PNG, optionally upscaled with nearest neighbour."""
    from PIL import Image

    if upscale > 1:
        array = array.repeat(upscale, axis=0).repeat(upscale, axis=1)
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def auto_upscale(height: int, target: int = 256) -> int:
    """Integer nearest-neighbour factor so small images (8x8 digits) are visible in a grid."""
    return max(1, target // max(1, height))
