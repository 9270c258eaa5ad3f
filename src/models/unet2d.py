"""UNet2D denoiser: residual blocks with scale-shift time/condition embedding, self- and cross-attention.

``forward(x_t, t, cond=None, context=None, context_mask=None)`` returns a tensor shaped like ``x_t``. ``cond_dim``
and ``context_dim`` come from the conditioner when the DiffusionModule builds the network (never set by hand).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difflab.models.layers import AttentionBlock, Downsample, ResBlock, TimeConditionEmbedding, Upsample, zero_init


class UNet2D(nn.Module):
    """A DDPM/ADM-style UNet. Level i has ``base_channels * channel_mults[i]`` channels at resolution H / 2^i."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1,),
        cross_attention_levels: Sequence[int] | None = None,
        dropout: float = 0.0,
        groups: int = 32,
        head_dim: int = 32,
        cond_dim: int = 0,
        context_dim: int | None = None,
        interval_input: bool = False,
        guidance_input: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        n_levels = len(channel_mults)
        for name, levels in (
            ("attention_levels", attention_levels),
            ("cross_attention_levels", cross_attention_levels or ()),
        ):
            bad = [lv for lv in levels if not 0 <= lv < n_levels]
            if bad:
                raise ValueError(
                    f"{name}={list(levels)} has levels outside 0..{n_levels - 1} (channel_mults has {n_levels})"
                )
        # Cross-attention defaults to wherever there is attention; a context with no consumer is an error upstream.
        xattn = (
            set(attention_levels if cross_attention_levels is None else cross_attention_levels)
            if context_dim
            else set()
        )
        emb_dim = 4 * base_channels
        self.embed = TimeConditionEmbedding(base_channels, emb_dim, cond_dim, interval_input, guidance_input)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def attn(level: int, ch: int):
            if level in attention_levels or level in xattn:
                return AttentionBlock(ch, head_dim, groups, context_dim if level in xattn else None)
            return None

        self.down = nn.ModuleList()
        skips, ch = [base_channels], base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                out = base_channels * mult
                self.down.append(nn.ModuleList([ResBlock(ch, out, emb_dim, dropout, groups), attn(level, out)]))
                ch = out
                skips.append(ch)
            if level < n_levels - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
        mid_ctx = context_dim if context_dim else None
        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, emb_dim, dropout, groups),
                AttentionBlock(ch, head_dim, groups, mid_ctx),
                ResBlock(ch, ch, emb_dim, dropout, groups),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                out = base_channels * mult
                self.up.append(
                    nn.ModuleList([ResBlock(ch + skips.pop(), out, emb_dim, dropout, groups), attn(level, out)])
                )
                ch = out
            if level > 0:
                self.up.append(Upsample(ch))
        self.norm_out = nn.GroupNorm(min(groups, ch), ch)
        self.conv_out = zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))

    def count_cross_attention(self) -> int:
        """Number of cross-attention modules (0 means a text context would be ignored)."""
        return sum(1 for m in self.modules() if isinstance(m, AttentionBlock) and m.cross is not None)

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
        emb = self.embed(t, cond, interval, guidance_scale)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            if isinstance(block, Downsample):
                h = block(h)
            else:
                h = block[0](h, emb)
                if block[1] is not None:
                    h = block[1](h, context, context_mask)
            hs.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h, context, context_mask)
        h = self.mid[2](h, emb)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block[0](torch.cat([h, hs.pop()], dim=1), emb)
                if block[1] is not None:
                    h = block[1](h, context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h)))
