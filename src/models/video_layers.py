"""Building blocks of the video denoisers (tensors are ``B x C x T x H x W`` unless said otherwise).

Factorised space-time layers: spatial convs/attention act on each frame, temporal convs/attention act on each
pixel (or token) across frames, so a video model costs little more than an image model of the same width.
Temporal attention knows frame offsets through a learned relative position bias (one scalar per head and offset,
offsets clamped to ``max_distance``), so it works for any number of frames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from difflab.models.layers import AttentionBlock, CrossAttention, _heads, zero_init


def check_video(x: torch.Tensor, name: str) -> None:
    """Fail with a one-line message unless ``x`` is a ``B x C x T x H x W`` video batch."""
    if x.ndim != 5:
        raise ValueError(
            f"{name} expects videos B x C x T x H x W, got a tensor of shape {tuple(x.shape)}; "
            "images need a frame axis (x[:, :, None])"
        )


class RelativePositionBias(nn.Module):
    """Learned attention bias ``b[head, clamp(j - i)]`` for query frame i and key frame j (T5-style, unbucketed).

    Offsets beyond ``max_distance`` share the bias of ``+-max_distance``, so any sequence length works.
    """

    def __init__(self, n_heads: int, max_distance: int = 32):
        super().__init__()
        if max_distance < 1:
            raise ValueError(f"max_distance must be >= 1, got {max_distance}")
        self.max_distance = int(max_distance)
        self.table = nn.Parameter(torch.zeros(n_heads, 2 * self.max_distance + 1))

    def forward(self, n: int) -> torch.Tensor:
        """``heads x n x n`` additive bias for a sequence of n frames."""
        pos = torch.arange(n, device=self.table.device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance) + self.max_distance
        return self.table[:, rel]


class TokenSelfAttention(nn.Module):
    """Multi-head self-attention on ``N x L x D`` tokens, with an optional relative position bias over L."""

    def __init__(self, dim: int, n_heads: int, relative_bias: bool = False, max_distance: int = 32):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"width {dim} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = RelativePositionBias(n_heads, max_distance) if relative_bias else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, length, d = tokens.shape
        q, k, v = (_heads(z, self.n_heads) for z in self.qkv(tokens).chunk(3, dim=-1))
        mask = None if self.bias is None else self.bias(length).to(q.dtype)[None]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(a.transpose(1, 2).reshape(n, length, d))


# ------------------------------------------------------------------------------------------------ conv (UNet3D) blocks
class ResBlock3D(nn.Module):
    """Factorised residual block: two per-frame 3x3 convs with scale-shift conditioning (as the 2D ResBlock), then a
    residual temporal conv (kernel ``temporal_kernel`` over T, zero-initialised so a new block starts per-frame)."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0, groups: int = 32, temporal_kernel: int = 3
    ):
        super().__init__()
        if temporal_kernel < 1 or temporal_kernel % 2 == 0:
            raise ValueError(f"temporal_kernel must be an odd number >= 1, got {temporal_kernel}")
        self.norm1 = nn.GroupNorm(min(groups, in_ch), in_ch)
        self.conv1 = nn.Conv3d(in_ch, out_ch, (1, 3, 3), padding=(0, 1, 1))
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv3d(out_ch, out_ch, (1, 3, 3), padding=(0, 1, 1)))
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.norm_t = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.conv_t = zero_init(
            nn.Conv3d(out_ch, out_ch, (temporal_kernel, 1, 1), padding=(temporal_kernel // 2, 0, 0))
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.skip(x) + self.conv2(self.dropout(F.silu(h)))
        return h + self.conv_t(F.silu(self.norm_t(h)))


class FrameAttention(nn.Module):
    """Self-attention within each frame, then optional cross-attention of every frame to the text tokens
    (the 2D `AttentionBlock` applied to the ``B*T`` frames)."""

    def __init__(self, channels: int, head_dim: int = 32, groups: int = 32, context_dim: int | None = None):
        super().__init__()
        self.block = AttentionBlock(channels, head_dim, groups, context_dim)

    @property
    def cross(self) -> CrossAttention | None:
        return self.block.cross

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        if self.block.cross is not None and context is not None:
            context = context.repeat_interleave(t, dim=0)
            context_mask = None if context_mask is None else context_mask.repeat_interleave(t, dim=0)
        out = self.block(frames, context, context_mask)
        return out.reshape(b, t, c, h, w).transpose(1, 2)


class TemporalAttention(nn.Module):
    """Residual self-attention across frames at every pixel, with a learned relative position bias; the output
    projection is zero-initialised so a new block starts as the identity."""

    def __init__(self, channels: int, head_dim: int = 32, groups: int = 32, max_distance: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, channels), channels)
        self.attn = TokenSelfAttention(
            channels, max(1, channels // head_dim), relative_bias=True, max_distance=max_distance
        )
        zero_init(self.attn.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)
        out = self.attn(tokens).reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)
        return x + out


class Downsample3D(nn.Module):
    """Stride-2 3x3 convolution on each frame (the frame count is kept)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv3d(ch, ch, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x):
        return self.conv(x)


class Upsample3D(nn.Module):
    """Nearest-neighbour x2 in H and W, then a 3x3 convolution on each frame."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv3d(ch, ch, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))


# --------------------------------------------------------------------------------------------- transformer blocks
def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class SpaceTimeBlock(nn.Module):
    """DiT-style transformer block on ``B x T x N x D`` tokens (N tokens per frame), conditioned by adaLN-Zero.

    Sub-layers, each residual: spatial self-attention (within a frame), temporal self-attention (across frames at
    each token position, relative position bias), cross-attention to the text tokens (optional, over all tokens),
    MLP. The attention and MLP branches are scaled and shifted by the conditioning embedding and gated by a
    zero-initialised gate, so a new block is the identity (Peebles & Xie 2023).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        emb_dim: int,
        context_dim: int | None = None,
        mlp_ratio: float = 4.0,
        max_distance: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm_s = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn_s = TokenSelfAttention(dim, n_heads)
        self.norm_t = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn_t = TokenSelfAttention(dim, n_heads, relative_bias=True, max_distance=max_distance)
        self.cross = CrossAttention(dim, context_dim, n_heads) if context_dim else None
        self.norm_m = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.ada = zero_init(nn.Linear(emb_dim, 9 * dim))

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, n, d = x.shape
        mods = self.ada(F.silu(emb))[:, None, None, :].chunk(9, dim=-1)
        sh_s, sc_s, g_s, sh_t, sc_t, g_t, sh_m, sc_m, g_m = mods
        h = _modulate(self.norm_s(x), sh_s, sc_s).reshape(b * t, n, d)
        x = x + g_s * self.attn_s(h).reshape(b, t, n, d)
        h = _modulate(self.norm_t(x), sh_t, sc_t).transpose(1, 2).reshape(b * n, t, d)
        x = x + g_t * self.attn_t(h).reshape(b, n, t, d).transpose(1, 2)
        if self.cross is not None:
            flat = x.reshape(b, t * n, d)
            x = (flat + self.cross(flat, context, context_mask)).reshape(b, t, n, d)
        return x + g_m * self.mlp(_modulate(self.norm_m(x), sh_m, sc_m))


def sincos_1d(n: int, dim: int, device=None) -> torch.Tensor:
    """Fixed sinusoidal embedding of positions 0..n-1: ``n x dim`` (sin half, cos half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / max(1, half))
    args = torch.arange(n, device=device, dtype=torch.float32)[:, None] * freqs[None]
    return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=-1), (0, dim % 2))


def sincos_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sinusoidal embedding (half the width for rows, half for columns): ``(h*w) x dim``."""
    dh = dim // 2
    rows = sincos_1d(h, dh, device)[:, None, :].expand(h, w, dh)
    cols = sincos_1d(w, dim - dh, device)[None, :, :].expand(h, w, dim - dh)
    return torch.cat([rows, cols], dim=-1).reshape(h * w, dim)
