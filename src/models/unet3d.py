"""UNet3D video denoiser: a factorised space-time UNet with text cross-attention and optional DiT bottleneck blocks.

Every residual block is a per-frame 2D block plus a temporal conv; chosen levels add per-frame self-attention,
temporal attention (relative position bias) and cross-attention to text tokens; the bottleneck can hold
``num_transformer_blocks`` adaLN-Zero space-time transformer blocks (the research log's "UNet3D with transformer
blocks"). Only H and W are downsampled; the frame count is kept at every level.

``forward(x_t, t, cond=None, context=None, context_mask=None)`` with ``x_t``: ``B x C x T x H x W`` returns a tensor
of the same shape; ``cond_dim`` and ``context_dim`` come from the conditioner (the DiffusionModule passes them).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difflab.models.layers import CrossAttention, TimeConditionEmbedding, zero_init
from difflab.models.video_layers import (
    Downsample3D,
    FrameAttention,
    ResBlock3D,
    SpaceTimeBlock,
    TemporalAttention,
    Upsample3D,
    check_video,
    sincos_1d,
)


def _check_levels(name: str, levels: Sequence[int], n_levels: int) -> set[int]:
    bad = [lv for lv in levels if not 0 <= lv < n_levels]
    if bad:
        raise ValueError(f"{name}={list(levels)} has levels outside 0..{n_levels - 1} (channel_mults has {n_levels})")
    return set(levels)


def space_to_depth(x: torch.Tensor, p: int) -> torch.Tensor:
    """``B x C x T x (H p) x (W p)`` -> ``B x (C p p) x T x H x W`` (each p x p pixel patch becomes channels)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def depth_to_space(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `space_to_depth`."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    c = cpp // (p * p)
    x = x.reshape(b, c, p, p, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, c, t, h * p, w * p)


class UNet3D(nn.Module):
    """Level i has ``base_channels * channel_mults[i]`` channels at H / 2^i x W / 2^i and all T frames.

    ``attention_levels``: per-frame self-attention; ``temporal_attention_levels`` (None = same as attention_levels):
    attention across frames; ``cross_attention_levels`` (None = same as attention_levels): text cross-attention,
    used only when the conditioner gives tokens (``context_dim``). The bottleneck always has frame attention (with
    cross-attention when there is text) and temporal attention, then ``num_transformer_blocks`` DiT blocks.
    ``frame_embedding`` adds an embedding of the absolute frame index to the input features (relative positions
    say how far apart two frames are, not which one is first; content that depends on the clip's start, such as
    where a moving object enters, needs the absolute index).
    ``patch_size`` > 1 folds p x p pixel patches into channels first (space-to-depth) and unfolds the output:
    every level then runs at 1/p of the resolution, a large saving for small CPU models.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1,),
        temporal_attention_levels: Sequence[int] | None = None,
        cross_attention_levels: Sequence[int] | None = None,
        num_transformer_blocks: int = 0,
        transformer_head_dim: int = 64,
        mlp_ratio: float = 4.0,
        temporal_kernel: int = 3,
        max_distance: int = 32,
        dropout: float = 0.0,
        groups: int = 32,
        head_dim: int = 32,
        patch_size: int = 1,
        frame_embedding: bool = True,
        cond_dim: int = 0,
        context_dim: int | None = None,
        interval_input: bool = False,
        guidance_input: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch, self.out_channels = int(patch_size), out_channels
        in_channels, out_channels = in_channels * self.patch**2, out_channels * self.patch**2
        n_levels = len(channel_mults)
        spatial = _check_levels("attention_levels", attention_levels, n_levels)
        temporal = _check_levels(
            "temporal_attention_levels",
            attention_levels if temporal_attention_levels is None else temporal_attention_levels,
            n_levels,
        )
        xattn = _check_levels(
            "cross_attention_levels",
            attention_levels if cross_attention_levels is None else cross_attention_levels,
            n_levels,
        )
        xattn = xattn if context_dim else set()
        emb_dim = 4 * base_channels
        self.embed = TimeConditionEmbedding(base_channels, emb_dim, cond_dim, interval_input, guidance_input)
        self.conv_in = nn.Conv3d(in_channels, base_channels, (1, 3, 3), padding=(0, 1, 1))
        # absolute frame index: sinusoid -> linear, added to the input features (any frame count works)
        self.frame_embed = nn.Linear(base_channels, base_channels) if frame_embedding else None
        rb = dict(emb_dim=emb_dim, dropout=dropout, groups=groups, temporal_kernel=temporal_kernel)

        def level_block(level: int, ch_in: int, ch: int) -> nn.ModuleList:
            frame = (
                FrameAttention(ch, head_dim, groups, context_dim if level in xattn else None)
                if (level in spatial or level in xattn)
                else None
            )
            temp = TemporalAttention(ch, head_dim, groups, max_distance) if level in temporal else None
            return nn.ModuleList([ResBlock3D(ch_in, ch, **rb), frame, temp])

        self.down = nn.ModuleList()
        skips, ch = [base_channels], base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                out = base_channels * mult
                self.down.append(level_block(level, ch, out))
                ch = out
                skips.append(ch)
            if level < n_levels - 1:
                self.down.append(Downsample3D(ch))
                skips.append(ch)
        self.mid_in = ResBlock3D(ch, ch, **rb)
        self.mid_frame = FrameAttention(ch, head_dim, groups, context_dim or None)
        self.mid_temporal = TemporalAttention(ch, head_dim, groups, max_distance)
        heads = max(1, ch // transformer_head_dim)
        if num_transformer_blocks and ch % heads:
            raise ValueError(f"bottleneck width {ch} is not divisible into heads of {transformer_head_dim}")
        self.transformer = nn.ModuleList(
            [
                SpaceTimeBlock(ch, heads, emb_dim, context_dim or None, mlp_ratio, max_distance, dropout)
                for _ in range(num_transformer_blocks)
            ]
        )
        self.mid_out = ResBlock3D(ch, ch, **rb)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                out = base_channels * mult
                self.up.append(level_block(level, ch + skips.pop(), out))
                ch = out
            if level > 0:
                self.up.append(Upsample3D(ch))
        self.norm_out = nn.GroupNorm(min(groups, ch), ch)
        self.conv_out = zero_init(nn.Conv3d(ch, out_channels, (1, 3, 3), padding=(0, 1, 1)))
        self.downsampling = self.patch * 2 ** (n_levels - 1)

    def count_cross_attention(self) -> int:
        """Number of text cross-attention modules (0 means a text context would be ignored)."""
        return sum(1 for m in self.modules() if isinstance(m, CrossAttention))

    @staticmethod
    def _apply_level(block: nn.ModuleList, h, emb, context, context_mask):
        h = block[0](h, emb)
        if block[1] is not None:
            h = block[1](h, context, context_mask)
        if block[2] is not None:
            h = block[2](h)
        return h

    def _bottleneck_transformer(self, h, emb, context, context_mask):
        b, c, t, hh, ww = h.shape
        x = h.permute(0, 2, 3, 4, 1).reshape(b, t, hh * ww, c)  # every block is residual (adaLN-Zero gates)
        for block in self.transformer:
            x = block(x, emb, context, context_mask)
        return x.reshape(b, t, hh, ww, c).permute(0, 4, 1, 2, 3)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        interval: torch.Tensor | None = None,
        guidance_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_video(x, "UNet3D")
        if x.shape[-1] % self.downsampling or x.shape[-2] % self.downsampling:
            raise ValueError(
                f"UNet3D: H x W = {x.shape[-2]} x {x.shape[-1]} must be divisible by "
                f"{self.downsampling} (2^(len(channel_mults) - 1))"
            )
        emb = self.embed(t, cond, interval, guidance_scale)
        h = self.conv_in(space_to_depth(x, self.patch))
        if self.frame_embed is not None:
            pos = self.frame_embed(sincos_1d(x.shape[2], self.frame_embed.in_features, x.device).to(h.dtype))
            h = h + pos.t()[None, :, :, None, None]
        hs = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample3D) else self._apply_level(block, h, emb, context, context_mask)
            hs.append(h)
        h = self.mid_in(h, emb)
        h = self.mid_frame(h, context, context_mask)
        h = self.mid_temporal(h)
        if len(self.transformer):
            h = self._bottleneck_transformer(h, emb, context, context_mask)
        h = self.mid_out(h, emb)
        for block in self.up:
            if isinstance(block, Upsample3D):
                h = block(h)
            else:
                h = self._apply_level(block, torch.cat([h, hs.pop()], dim=1), emb, context, context_mask)
        return depth_to_space(self.conv_out(F.silu(self.norm_out(h))), self.patch)
