"""ViViT-style video denoiser: tubelet embedding and factorised space-then-time transformer blocks.

Tubelets of ``tubelet_size x patch_size x patch_size`` become tokens (fixed sinusoidal space and time positions);
each block attends within a frame, then across frames (learned relative position bias), then to the text tokens,
then applies an MLP, all conditioned on time + text vector by adaLN-Zero. The output head predicts the tubelet
pixels and multiplies them by a learnable per-channel output scale.

Two choices follow the research log, where this model learned poorly at low timesteps until both were made:
there is NO input residual (the output is not ``x_t + f(x_t)``: at low noise x_t is almost the clean video while
the eps / v target is almost the noise, so a residual network must first learn to cancel its own input), and the
output scale is learnable (the zero-initialised head plus a free per-channel scale lets the network match the
target's magnitude quickly).
``input_residual=True`` restores the old behaviour for ablations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from difflab.models.layers import CrossAttention, TimeConditionEmbedding, zero_init
from difflab.models.video_layers import SpaceTimeBlock, check_video, sincos_1d, sincos_2d


class ViViT(nn.Module):
    """Factorised space-time transformer denoiser; ``forward(x, t, cond, context, context_mask)`` like UNet2D.

    ``cross_attention_every``: every k-th block (counted from the first) cross-attends to the text tokens when the
    conditioner provides them (1 = every block, 0 = none, which fails loudly upstream when text is configured).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        patch_size: int = 4,
        tubelet_size: int = 1,
        hidden_dim: int = 256,
        depth: int = 8,
        head_dim: int = 64,
        mlp_ratio: float = 4.0,
        cross_attention_every: int = 1,
        max_distance: int = 32,
        dropout: float = 0.0,
        input_residual: bool = False,
        learn_output_scale: bool = True,
        output_scale_init: float = 1.0,
        cond_dim: int = 0,
        context_dim: int | None = None,
        interval_input: bool = False,
        guidance_input: bool = False,
    ):
        super().__init__()
        if hidden_dim % head_dim:
            raise ValueError(f"hidden_dim={hidden_dim} must be a multiple of head_dim={head_dim}")
        if patch_size < 1 or tubelet_size < 1:
            raise ValueError(f"patch_size and tubelet_size must be >= 1, got {patch_size}, {tubelet_size}")
        out_channels = out_channels or in_channels
        if input_residual and out_channels != in_channels:
            raise ValueError("input_residual=True needs out_channels == in_channels")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.patch, self.tubelet, self.hidden_dim = patch_size, tubelet_size, hidden_dim
        self.input_residual = bool(input_residual)
        self.embed = TimeConditionEmbedding(hidden_dim, hidden_dim, cond_dim, interval_input, guidance_input)
        self.patch_embed = nn.Conv3d(
            in_channels,
            hidden_dim,
            (tubelet_size, patch_size, patch_size),
            stride=(tubelet_size, patch_size, patch_size),
        )
        n_heads = hidden_dim // head_dim
        every = int(cross_attention_every)
        self.blocks = nn.ModuleList(
            [
                SpaceTimeBlock(
                    hidden_dim,
                    n_heads,
                    hidden_dim,
                    context_dim if (context_dim and every > 0 and i % every == 0) else None,
                    mlp_ratio,
                    max_distance,
                    dropout,
                )
                for i in range(depth)
            ]
        )
        self.norm_out = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = zero_init(nn.Linear(hidden_dim, 2 * hidden_dim))
        self.head = zero_init(nn.Linear(hidden_dim, tubelet_size * patch_size * patch_size * out_channels))
        scale = torch.full((out_channels,), float(output_scale_init))
        if learn_output_scale:
            self.output_scale = nn.Parameter(scale)
        else:
            self.register_buffer("output_scale", scale)
        self._pos_cache: dict = {}

    def count_cross_attention(self) -> int:
        """Number of text cross-attention modules (0 means a text context would be ignored)."""
        return sum(1 for m in self.modules() if isinstance(m, CrossAttention))

    def _positions(self, t: int, h: int, w: int, device) -> torch.Tensor:
        key = (t, h, w, str(device))
        if key not in self._pos_cache:
            d = self.hidden_dim
            pos = sincos_2d(h, w, d, device)[None, :, :] + sincos_1d(t, d, device)[:, None, :]
            self._pos_cache = {key: pos}  # one entry: shapes do not change during a run
        return self._pos_cache[key]

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
        check_video(x, "ViViT")
        b, c, nt, nh, nw = x.shape
        if nt % self.tubelet or nh % self.patch or nw % self.patch:
            raise ValueError(
                f"ViViT: T x H x W = {nt} x {nh} x {nw} must be divisible by tubelet_size={self.tubelet} "
                f"and patch_size={self.patch}"
            )
        emb = self.embed(t, cond, interval, guidance_scale)
        tokens = self.patch_embed(x)  # B x D x T' x H' x W'
        _, d, tt, th, tw = tokens.shape
        h = tokens.permute(0, 2, 3, 4, 1).reshape(b, tt, th * tw, d)
        h = h + self._positions(tt, th, tw, x.device).to(h.dtype)
        for block in self.blocks:
            h = block(h, emb, context, context_mask)
        shift, scale = self.ada_out(F.silu(emb))[:, None, None, :].chunk(2, dim=-1)
        h = self.head(self.norm_out(h) * (1 + scale) + shift)  # B x T' x N x (tubelet * p * p * C)
        h = h.reshape(b, tt, th, tw, self.tubelet, self.patch, self.patch, self.out_channels)
        out = h.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.out_channels, nt, nh, nw)
        out = out * self.output_scale.to(out.dtype).view(1, -1, 1, 1, 1)
        return out + x if self.input_residual else out
