"""Latent normalisation: per-channel statistics streamed over a memory map, and the affine map to a target std."""

from __future__ import annotations

import numpy as np
import torch

from difflab.utils.errors import ConfigError


def channel_moments(latents: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, variance, count-per-channel) over all axes but 1 of an N x C x ... array, streamed in float64.

    Chunks are combined with Chan et al.'s parallel update, so a memory-mapped array is never loaded whole.
    """
    c = latents.shape[1]
    n, mean, m2 = 0, np.zeros(c), np.zeros(c)
    for i in range(0, len(latents), chunk):
        block = np.asarray(latents[i : i + chunk], dtype=np.float64)
        block = np.moveaxis(block, 1, 0).reshape(c, -1)
        nb = block.shape[1]
        mb = block.mean(1)
        m2b = ((block - mb[:, None]) ** 2).sum(1)
        delta = mb - mean
        tot = n + nb
        mean = mean + delta * nb / tot
        m2 = m2 + m2b + delta**2 * n * nb / tot
        n = tot
    if n == 0:
        raise ConfigError("cannot compute latent statistics over an empty train split")
    return mean, m2 / n, n


def normalisation(mean: np.ndarray, var: np.ndarray, target_std: float, per_channel: bool = True) -> dict:
    """The affine map to zero mean and ``target_std`` std: {target_std, per_channel, mean, std, scale, shift}.

    With ``per_channel=False`` one mean/std (pooled over channels) is used for all channels.
    """
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    if not per_channel:
        pooled_mean = mean.mean()
        pooled_var = (var + (mean - pooled_mean) ** 2).mean()  # equal counts per channel
        mean, var = np.full_like(mean, pooled_mean), np.full_like(var, pooled_var)
    std = np.sqrt(var)
    if np.any(std <= 0) or not np.all(np.isfinite(std)):
        raise ConfigError(
            f"latent std per channel is {std.tolist()}: a channel is constant or not finite, cannot "
            f"normalise (is the autoencoder trained?)"
        )
    scale = float(target_std) / std
    shift = -mean * scale
    return {
        "type": "affine",
        "target_std": float(target_std),
        "per_channel": bool(per_channel),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "scale": scale.tolist(),
        "shift": shift.tolist(),
    }


def _channel_view(v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return v.to(device=z.device, dtype=z.dtype).view(1, -1, *([1] * (z.dim() - 2)))


def normalise(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Raw latents (B x C x ...) -> normalised: z * scale + shift per channel."""
    return z * _channel_view(scale, z) + _channel_view(shift, z)


def denormalise(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> raw latents the autoencoder decodes: (x - shift) / scale per channel."""
    return (x - _channel_view(shift, x)) / _channel_view(scale, x)
