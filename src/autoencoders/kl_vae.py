"""difflab's own KL-regularised convolutional autoencoder (the latent-diffusion first stage).

Encoder: conv -> per level (``num_res_blocks`` residual blocks, stride-2 conv) -> middle block -> a diagonal
Gaussian posterior (mean, logvar) with ``latent_channels`` channels. Decoder mirrors it with nearest-neighbour
upsampling. Every level halves the resolution, so ``len(channel_mults)`` levels give a down-sampling factor of
``2 ** len(channel_mults)`` (2 levels -> 4x, 3 -> 8x).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difflab.autoencoders.loading import autoencoder_identity

LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite early in training


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, 3x3 conv) x2 with a 1x1 skip when widths differ."""

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head spatial self-attention over all positions (used in the middle block only)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


def _mid_block(channels: int, groups: int, attention: bool, dropout: float) -> nn.Sequential:
    layers = [ResBlock(channels, channels, groups, dropout)]
    if attention:
        layers.append(SelfAttention(channels, groups))
    layers.append(ResBlock(channels, channels, groups, dropout))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Pixels (B x in_channels x H x W) -> 2*latent_channels moments at H/f x W/f."""

    def __init__(
        self, in_channels, latent_channels, base_channels, channel_mults, num_res_blocks, groups, attention, dropout
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        blocks, ch = [], base_channels
        for mult in channel_mults:
            out = base_channels * mult
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out, groups, dropout))
                ch = out
            blocks.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.down = nn.Sequential(*blocks)
        self.mid = _mid_block(ch, groups, attention, dropout)
        self.norm_out = _norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B x latent_channels x h x w) -> pixels at h*f x w*f (unbounded; ``decode`` clamps)."""

    def __init__(
        self, out_channels, latent_channels, base_channels, channel_mults, num_res_blocks, groups, attention, dropout
    ):
        super().__init__()
        ch = base_channels * channel_mults[-1]
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.mid = _mid_block(ch, groups, attention, dropout)
        blocks = []
        for mult in reversed(channel_mults):
            out = base_channels * mult
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out, groups, dropout))
                ch = out
        self.up = nn.Sequential(*blocks)
        self.norm_out = _norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over all latent dimensions (shape B)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class KLAutoencoder(nn.Module):
    """Convolutional VAE with a diagonal Gaussian posterior; ``encode``/``decode`` follow the autoencoder contract.

    Pixel inputs and decoded outputs live in [-1, 1]. ``downsample_factor`` = 2 ** len(channel_mults).
    """

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 1,
        norm_groups: int = 32,
        mid_attention: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(channel_mults) < 1:
            raise ValueError("KLAutoencoder: channel_mults needs at least one level (each level halves H and W)")
        channel_mults = [int(m) for m in channel_mults]
        self.config = dict(
            in_channels=int(in_channels),
            latent_channels=int(latent_channels),
            base_channels=int(base_channels),
            channel_mults=channel_mults,
            num_res_blocks=int(num_res_blocks),
            norm_groups=int(norm_groups),
            mid_attention=bool(mid_attention),
            dropout=float(dropout),
        )
        self.in_channels = int(in_channels)
        self.latent_channels = int(latent_channels)
        self.downsample_factor = 2 ** len(channel_mults)
        args = (base_channels, channel_mults, num_res_blocks, norm_groups, mid_attention, dropout)
        self.encoder = Encoder(in_channels, latent_channels, *args)
        self.decoder = Decoder(in_channels, latent_channels, *args)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of q(z | x), each B x latent_channels x H/f x W/f."""
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(
                f"KLAutoencoder: image size {tuple(x.shape[-2:])} must be divisible by the down-sampling factor {f}"
            )
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents for pixels x in [-1, 1]: the posterior mean, or a reparameterised sample with ``sample=True``."""
        mean, logvar = self.posterior(x)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + (0.5 * logvar).exp() * noise

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (clamped) for latents z."""
        return self.decoder(z).clamp(-1, 1)

    def forward(self, x: torch.Tensor, sample: bool = True) -> dict:
        """Reconstruction (unclamped, for losses) and posterior statistics: {recon, mean, logvar, z}."""
        mean, logvar = self.posterior(x)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean) if sample else mean
        return {"recon": self.decoder(z), "mean": mean, "logvar": logvar, "z": z}

    def identity(self) -> dict:
        """{class, config, hash}: what a latent cache records to know which autoencoder produced it."""
        return autoencoder_identity(self)
