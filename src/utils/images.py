"""Image grids and PNG writing for samples and figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difflab.ops.atomic import atomic_write


def round_to_uint8(values: torch.Tensor) -> torch.Tensor:
    """Float pixel values on the 0..255 scale -> uint8 (same shape and device): round half to even, clamp to 0..255.

    The project's one uint8 rounding rule: ``to_uint8`` and the uint8 resizers of the data pipelines use it, so
    images written to disk, fed to Inception / I3D and stored in datasets are quantised identically.
    """
    return values.round().clamp_(0, 255).to(torch.uint8)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (the batch convention) -> uint8 [0, 255], same shape and device; uint8 input is returned as is.

    ``round_to_uint8((x.clamp(-1, 1) + 1) * 127.5)`` computed in float32: -1 -> 0, 1 -> 255, 0 -> 128 (127.5 rounds
    half to even), values outside [-1, 1] saturate, and ``k / 127.5 - 1`` maps back to ``k`` for every uint8 ``k``.
    It differs from StyleGAN's ``(x * 127.5 + 128).clamp(0, 255).to(uint8)`` only on exact float ties. Every
    [-1, 1] -> uint8 conversion (PNG grids, samples.npz, videos, FID / FVD / CLIP inputs) goes through here.
    """
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise TypeError(f"to_uint8: expected float pixels in [-1, 1] or uint8, got dtype {x.dtype}")
    return round_to_uint8((x.detach().float().clamp(-1, 1) + 1) * 127.5)


def make_grid(images: torch.Tensor, nrow: int, pad: int = 1, pad_value: int = 0) -> np.ndarray:
    """N x C x H x W uint8 images (any device) -> H' x W' x C uint8 numpy grid with ``nrow`` images per row."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = arr[i]
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
