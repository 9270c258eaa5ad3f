"""Building blocks shared by the denoisers: time embedding, conditioned residual blocks, attention."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, B -> B x dim (cos half first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def time_mlp(base_dim: int, emb_dim: int) -> nn.Sequential:
    """The MLP that turns a sinusoidal time embedding into the denoiser's embedding width."""
    return nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


GUIDANCE_INPUT_FACTOR = 100.0  # a guidance scale w is embedded as time 100 w: w in [0, 10] spans the time range


class TimeConditionEmbedding(nn.Module):
    """Time embedding MLP plus an optional projected condition vector added to it. With ``interval_input``, a second
    time MLP embeds the length of a time interval (MeanFlow's t - r, in the denoiser's time units; 0 when not given:
    the instantaneous velocity) and adds it too. With ``guidance_input``, a third embeds a guidance scale (a
    guidance-distilled student, Meng et al. 2023; 1 when not given: plain conditional); its output layer starts at
    zero, so a student built from an unguided teacher starts as that teacher."""

    def __init__(
        self,
        base_dim: int,
        emb_dim: int,
        cond_dim: int = 0,
        interval_input: bool = False,
        guidance_input: bool = False,
    ):
        super().__init__()
        self.base_dim = base_dim
        self.mlp = time_mlp(base_dim, emb_dim)
        self.cond_proj = nn.Linear(cond_dim, emb_dim) if cond_dim else None
        self.interval_mlp = time_mlp(base_dim, emb_dim) if interval_input else None
        self.guidance_mlp = guidance_scale_mlp(base_dim, emb_dim) if guidance_input else None

    def forward(
        self,
        t: torch.Tensor,
        cond: torch.Tensor | None,
        interval: torch.Tensor | None = None,
        guidance_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.mlp(timestep_embedding(t, self.base_dim))
        if self.interval_mlp is not None:
            interval = torch.zeros_like(t) if interval is None else interval
            emb = emb + self.interval_mlp(timestep_embedding(interval, self.base_dim))
        elif interval is not None:
            raise ValueError("this denoiser has no interval input: build it with model.net.interval_input=true")
        if self.guidance_mlp is not None:
            w = torch.ones_like(t) if guidance_scale is None else torch.as_tensor(guidance_scale).to(t).expand_as(t)
            emb = emb + self.guidance_mlp(timestep_embedding(GUIDANCE_INPUT_FACTOR * w, self.base_dim))
        elif guidance_scale is not None:
            raise ValueError(
                "this denoiser has no guidance-scale input: build it with model.net.guidance_input=true "
                "(a guidance-distilled student)"
            )
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError("this denoiser was built with a condition vector (cond_dim > 0) but got cond=None")
            emb = emb + self.cond_proj(cond.to(emb.dtype))
        return emb


def guidance_scale_mlp(base_dim: int, emb_dim: int) -> nn.Sequential:
    """The guidance-scale MLP: a time MLP whose output layer is zero (it adds nothing until trained)."""
    mlp = time_mlp(base_dim, emb_dim)
    zero_init(mlp[2])
    return mlp


def has_guidance_input(denoiser: nn.Module) -> bool:
    """Whether a denoiser takes a guidance scale (built with ``guidance_input``)."""
    return getattr(getattr(denoiser, "embed", None), "guidance_mlp", None) is not None


def add_guidance_input(denoiser: nn.Module) -> None:
    """Give a denoiser without one a guidance-scale input that adds nothing (its outputs stay the same): a teacher
    then has its guidance-distilled student's parameters. Refuses (ValueError) a denoiser without a time embedding."""
    embed = getattr(denoiser, "embed", None)
    if not isinstance(embed, TimeConditionEmbedding):
        raise ValueError(f"{type(denoiser).__name__} has no time embedding to add a guidance-scale input to")
    if embed.guidance_mlp is None:
        out = cast(nn.Linear, embed.mlp[2])
        embed.guidance_mlp = guidance_scale_mlp(embed.base_dim, out.out_features).to(out.weight)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with scale-shift conditioning on the embedding and dropout."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, n_heads, c // n_heads).transpose(1, 2)


class AttentionBlock(nn.Module):
    """Residual self-attention over spatial positions, then (optionally) cross-attention to context tokens."""

    def __init__(self, channels: int, head_dim: int = 32, groups: int = 32, context_dim: int | None = None):
        super().__init__()
        self.n_heads = max(1, channels // head_dim)
        self.norm = nn.GroupNorm(min(groups, channels), channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))
        self.cross = CrossAttention(channels, context_dim, self.n_heads) if context_dim else None

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = (_heads(z, self.n_heads) for z in self.qkv(tokens).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        out = x.flatten(2).transpose(1, 2) + self.proj(a)
        if self.cross is not None:
            out = out + self.cross(out, context, context_mask)
        # A transposed view would make every following convolution run in a slow layout: copy into x's format.
        fmt = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            else torch.contiguous_format
        )
        return out.transpose(1, 2).reshape(b, c, h, w).contiguous(memory_format=fmt)


class CrossAttention(nn.Module):
    """Queries from image tokens, keys/values from context tokens (text), padding masked out; zero-initialised out."""

    def __init__(self, channels: int, context_dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, tokens: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        if context is None:
            raise ValueError("this denoiser has cross-attention (context_dim set) but got no context tokens")
        b, n, c = tokens.shape
        q = _heads(self.q(self.norm(tokens)), self.n_heads)
        k, v = (_heads(z, self.n_heads) for z in self.kv(context.to(tokens.dtype)).chunk(2, dim=-1))
        attn_mask = None if mask is None else mask.bool()[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(a.transpose(1, 2).reshape(b, n, c))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
