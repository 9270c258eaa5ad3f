"""Diffusion transformers: DiT / SiT for images (Peebles & Xie 2023; Ma et al. 2024) and a space-time video DiT.

An input is cut into patches (images ``p x p``, videos ``tubelet x p x p``), each patch becomes a token, a stack of
adaLN-Zero transformer blocks processes the tokens, and a zero-initialised linear head maps each token back to its
patch. The time embedding plus the conditioner's vector (a class embedding, a pooled text vector) modulates every
block (adaLN-Zero: shift, scale and a gate per branch, regressed from the embedding; the gates start at zero so every
block starts as the identity). Text tokens reach the image either by cross-attention after self-attention in every
block (``text_mode="cross"``, PixArt-alpha) or by joint attention over the concatenated text and image tokens with
separate weights per stream (``text_mode="joint"``, SD3's MMDiT).

Positions are fixed 2D/3D sin-cos tables added to the tokens (``pos_embed="sincos"``, DiT) or rotary embeddings
applied to queries and keys, one band of frequencies per axis (``pos_embed="rope"``). Videos attend within frames
then across frames (``attention="factorised"``) or over all tokens at once (``"full"``); the number of frames may be
anything up to ``max_frames``.

Performance switches, each one config value: ``fused_qkv`` (one projection for queries, keys and values),
``checkpoint_activations`` (blocks recompute their activations in the backward pass: less memory, ~30% more
compute), ``compile_blocks`` (``torch.compile`` of each block, "regional compilation": every block has the same
code, so one compilation serves all). bf16 is the trainer's precision setting.

``forward(x, t, cond=None, context=None, context_mask=None)`` follows the denoiser contract (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from difflab.models.layers import CrossAttention, TimeConditionEmbedding, zero_init
from difflab.models.video_layers import sincos_1d
from difflab.registry import DIT_PRESETS
from difflab.utils.errors import ConfigError

PRESETS = DIT_PRESETS  # depth, hidden width, heads (difflab.registry)
POS_EMBEDS = ("sincos", "rope")
TEXT_MODES = ("cross", "joint")
VIDEO_ATTENTION = ("factorised", "full")


def resolve_size(size: str, depth: int | None, hidden_dim: int | None, num_heads: int | None) -> tuple[int, int, int]:
    """(depth, hidden, heads) of a preset, with any value given explicitly taking precedence."""
    if size not in PRESETS:
        raise ConfigError(f"model.net.size={size!r} is not a DiT preset: choose one of {', '.join(PRESETS)}")
    d, h, n = PRESETS[size]
    d, h, n = depth or d, hidden_dim or h, num_heads or n
    if h % n or (h // n) % 2:
        raise ConfigError(f"model.net.hidden_dim={h} must split into model.net.num_heads={n} heads of even width")
    return d, h, n


# ------------------------------------------------------------------------------------------------------- positions
def sincos_grid(grid: Sequence[int], dim: int, device=None) -> torch.Tensor:
    """Fixed sin-cos position table for a token grid (rows, columns[, ...]): ``prod(grid) x dim``. As DiT's
    ``get_2d_sincos_pos_embed``, the first share of the width encodes the last axis (columns), the next the one
    before it, each share sines then cosines; the first axis gets the remainder."""
    n_axes = len(grid)
    shares = [dim // n_axes] * n_axes
    shares[0] += dim - sum(shares)
    tables = []
    for i in reversed(range(n_axes)):
        table = sincos_1d(grid[i], shares[i], device)
        shape = [1] * n_axes + [shares[i]]
        shape[i] = grid[i]
        tables.append(table.view(shape).expand(*grid, shares[i]))
    return torch.cat(tables, dim=-1).reshape(-1, dim)


def rope_tables(grid: Sequence[int], head_dim: int, device=None, base: float = 10000.0):
    """Rotary embedding (cos, sin), each ``prod(grid) x head_dim/2``: the head's channel pairs are shared out between
    the grid's axes and rotate by the token's coordinate along their axis (Su et al. 2021, axial variant)."""
    pairs = head_dim // 2
    shares = [pairs // len(grid)] * (len(grid) - 1)
    shares.append(pairs - sum(shares))
    coords = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in grid], indexing="ij")
    angles = []
    for coord, share in zip(coords, shares):
        freqs = base ** (-torch.arange(share, device=device, dtype=torch.float32) / max(1, share))
        angles.append(coord.reshape(-1, 1) * freqs[None])
    angle = torch.cat(angles, dim=-1)
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, rope) -> torch.Tensor:
    """Rotate the channel pairs (2i, 2i+1) of ``... x L x head_dim`` queries or keys by the table's angles."""
    cos, sin = (r.to(x.dtype) for r in rope)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


# ------------------------------------------------------------------------------------------------------- attention
class QKV(nn.Module):
    """Queries, keys and values in heads (``B x heads x L x head_dim``): one fused projection or three."""

    def __init__(self, dim: int, n_heads: int, fused: bool = True):
        super().__init__()
        self.n_heads, self.fused = n_heads, fused
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope=None):
        parts = self.qkv(x).chunk(3, dim=-1) if self.fused else (self.q(x), self.k(x), self.v(x))
        q, k, v = (p.unflatten(-1, (self.n_heads, -1)).transpose(1, 2) for p in parts)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v


def merge_heads(a: torch.Tensor) -> torch.Tensor:
    """``B x heads x L x head_dim`` -> ``B x L x (heads * head_dim)``."""
    return a.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels)."""

    def __init__(self, dim: int, n_heads: int, fused_qkv: bool = True):
        super().__init__()
        self.qkv = QKV(dim, n_heads, fused_qkv)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        q, k, v = self.qkv(x, rope)
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


def mlp(dim: int, ratio: float) -> nn.Sequential:
    """The transformer MLP (GELU, tanh approximation, as DiT)."""
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def layer_norm(dim: int) -> nn.LayerNorm:
    """LayerNorm without affine parameters: adaLN provides scale and shift."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Modulation(nn.Module):
    """adaLN-Zero: SiLU + a zero-initialised linear map from the embedding to n modulation vectors of width dim."""

    def __init__(self, emb_dim: int, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = zero_init(nn.Linear(emb_dim, n * dim))

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(emb)).chunk(self.n, dim=-1)


def expand_to(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample modulation ``B x D`` broadcast over the token axes of ``x`` (``B x ... x D``)."""
    return m.view(m.shape[0], *([1] * (x.ndim - 2)), m.shape[-1])


# ---------------------------------------------------------------------------------------------------------- blocks
class DiTBlock(nn.Module):
    """adaLN-Zero block on ``B x L x D`` tokens: self-attention, optional cross-attention to text, MLP."""

    def __init__(
        self, dim: int, n_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None, fused_qkv: bool = True
    ):
        super().__init__()
        self.norm1, self.attn = layer_norm(dim), SelfAttention(dim, n_heads, fused_qkv)
        self.cross = CrossAttention(dim, context_dim, n_heads) if context_dim else None
        self.norm2, self.mlp = layer_norm(dim), mlp(dim, mlp_ratio)
        self.ada = Modulation(dim, dim, 6)

    def forward(self, x, emb, context=None, context_mask=None, rope=None):
        sh1, sc1, g1, sh2, sc2, g2 = (expand_to(m, x) for m in self.ada(emb))
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1), rope)
        if self.cross is not None:
            x = x + self.cross(x, context, context_mask)
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


class JointBlock(nn.Module):
    """MMDiT block: image and text streams with their own weights and modulations, one attention over both.

    Text keys at padded positions are masked out; text tokens carry no rotary position (RoPE rotates image tokens
    only). Returns both streams. The last block has ``update_text=False``: its text output would be unused, so it
    only provides keys and values (SD3's ``context_pre_only``).
    """

    def __init__(
        self, dim: int, n_heads: int, mlp_ratio: float = 4.0, fused_qkv: bool = True, update_text: bool = True
    ):
        super().__init__()
        self.update_text = update_text
        self.x_norm1, self.x_qkv, self.x_proj = layer_norm(dim), QKV(dim, n_heads, fused_qkv), nn.Linear(dim, dim)
        self.x_norm2, self.x_mlp = layer_norm(dim), mlp(dim, mlp_ratio)
        self.x_ada = Modulation(dim, dim, 6)
        self.c_norm1, self.c_qkv = layer_norm(dim), QKV(dim, n_heads, fused_qkv)
        self.c_ada = Modulation(dim, dim, 6 if update_text else 2)
        if update_text:
            self.c_proj, self.c_norm2, self.c_mlp = nn.Linear(dim, dim), layer_norm(dim), mlp(dim, mlp_ratio)

    def forward(self, x, emb, context, context_mask=None, rope=None):
        if context is None:
            raise ValueError("this DiT uses joint text attention (text_mode=joint) but got no context tokens")
        xm = [expand_to(m, x) for m in self.x_ada(emb)]
        cm = [expand_to(m, context) for m in self.c_ada(emb)]
        qx, kx, vx = self.x_qkv(modulate(self.x_norm1(x), xm[0], xm[1]), rope)
        qc, kc, vc = self.c_qkv(modulate(self.c_norm1(context), cm[0], cm[1]))
        mask = None
        if context_mask is not None:
            keep_image = torch.ones(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
            mask = torch.cat([context_mask.bool(), keep_image], dim=1)[:, None, None, :]
        n_text = context.shape[1]
        if self.update_text:
            q = torch.cat([qc, qx], 2)
        else:
            q = qx  # only the image queries are needed
        a = F.scaled_dot_product_attention(q, torch.cat([kc, kx], 2), torch.cat([vc, vx], 2), attn_mask=mask)
        ax = merge_heads(a[:, :, n_text:] if self.update_text else a)
        x = x + xm[2] * self.x_proj(ax)
        x = x + xm[5] * self.x_mlp(modulate(self.x_norm2(x), xm[3], xm[4]))
        if self.update_text:
            context = context + cm[2] * self.c_proj(merge_heads(a[:, :, :n_text]))
            context = context + cm[5] * self.c_mlp(modulate(self.c_norm2(context), cm[3], cm[4]))
        return x, context


class SpaceTimeDiTBlock(nn.Module):
    """Factorised video block on ``B x T x N x D`` tokens: attention within each frame, then across frames at each
    token position, optional cross-attention to text (all tokens), MLP; each branch modulated and gated (adaLN-Zero)."""

    def __init__(
        self, dim: int, n_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None, fused_qkv: bool = True
    ):
        super().__init__()
        self.norm_s, self.attn_s = layer_norm(dim), SelfAttention(dim, n_heads, fused_qkv)
        self.norm_t, self.attn_t = layer_norm(dim), SelfAttention(dim, n_heads, fused_qkv)
        self.cross = CrossAttention(dim, context_dim, n_heads) if context_dim else None
        self.norm_m, self.mlp = layer_norm(dim), mlp(dim, mlp_ratio)
        self.ada = Modulation(dim, dim, 9)

    def forward(self, x, emb, context=None, context_mask=None, rope=None):
        b, t, n, d = x.shape
        rope_s, rope_t = rope if rope is not None else (None, None)
        m = [expand_to(v, x) for v in self.ada(emb)]
        h = modulate(self.norm_s(x), m[0], m[1]).reshape(b * t, n, d)
        x = x + m[2] * self.attn_s(h, rope_s).reshape(b, t, n, d)
        h = modulate(self.norm_t(x), m[3], m[4]).transpose(1, 2).reshape(b * n, t, d)
        x = x + m[5] * self.attn_t(h, rope_t).reshape(b, n, t, d).transpose(1, 2)
        if self.cross is not None:
            flat = x.reshape(b, t * n, d)
            x = (flat + self.cross(flat, context, context_mask)).reshape(b, t, n, d)
        return x + m[8] * self.mlp(modulate(self.norm_m(x), m[6], m[7]))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a zero-initialised linear map from each token to its patch's values."""

    def __init__(self, dim: int, patch_values: int):
        super().__init__()
        self.norm, self.ada = layer_norm(dim), Modulation(dim, dim, 2)
        self.linear = zero_init(nn.Linear(dim, patch_values))

    def forward(self, x, emb):
        shift, scale = (expand_to(m, x) for m in self.ada(emb))
        return self.linear(modulate(self.norm(x), shift, scale))


# ---------------------------------------------------------------------------------------------------------- models
class _TransformerBase(nn.Module):
    """What the image and video DiTs share: sizes, time/condition embedding, block stack and its run options."""

    def _setup(
        self,
        size,
        depth,
        hidden_dim,
        num_heads,
        mlp_ratio,
        pos_embed,
        text_mode,
        fused_qkv,
        checkpoint_activations,
        compile_blocks,
        freq_dim,
        cond_dim,
        context_dim,
        interval_input=False,
        guidance_input=False,
    ):
        if pos_embed not in POS_EMBEDS:
            raise ConfigError(f"model.net.pos_embed={pos_embed!r}: choose one of {', '.join(POS_EMBEDS)}")
        if text_mode not in TEXT_MODES:
            raise ConfigError(f"model.net.text_mode={text_mode!r}: choose one of {', '.join(TEXT_MODES)}")
        self.depth, self.hidden_dim, self.num_heads = resolve_size(size, depth, hidden_dim, num_heads)
        self.mlp_ratio, self.pos_embed, self.fused_qkv = float(mlp_ratio), pos_embed, bool(fused_qkv)
        self.checkpoint_activations = bool(checkpoint_activations)
        self.text_mode = text_mode if context_dim else None
        # MeanFlow's interval and a guidance-distilled student's scale are embedded like the time
        self.embed = TimeConditionEmbedding(freq_dim, self.hidden_dim, cond_dim, interval_input, guidance_input)
        self.context_embed = nn.Linear(context_dim, self.hidden_dim) if self.text_mode == "joint" else None
        self._compile_blocks = bool(compile_blocks)
        self._pos_cache: dict = {}

    def _init_weights(self):
        """DiT's initialisation: Xavier-uniform linear layers and patch embedding, N(0, 0.02) time MLP; the
        modulations, the output layer and cross-attention outputs zero (each block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.hidden_dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.embed.mlp[2].weight, std=0.02)
        for mlp in (self.embed.interval_mlp, self.embed.guidance_mlp):
            if mlp is not None:
                nn.init.normal_(mlp[0].weight, std=0.02)
                nn.init.normal_(mlp[2].weight, std=0.02)
        if self.embed.guidance_mlp is not None:  # starts adding nothing: the student starts as its teacher
            zero_init(self.embed.guidance_mlp[2])
        for m in self.modules():
            if isinstance(m, Modulation):
                zero_init(m.linear)
            elif isinstance(m, CrossAttention):
                zero_init(m.proj)
            elif isinstance(m, FinalLayer):
                zero_init(m.linear)

    def _make_blocks(self, block: type, context_dim: int | None) -> nn.ModuleList:
        """``depth`` blocks of the given kind, or joint text-image blocks (the last one without a text output)."""
        d, heads, ratio, fused = self.hidden_dim, self.num_heads, self.mlp_ratio, self.fused_qkv
        if self.text_mode == "joint":
            return nn.ModuleList([JointBlock(d, heads, ratio, fused, i < self.depth - 1) for i in range(self.depth)])
        return nn.ModuleList([block(d, heads, ratio, context_dim, fused) for _ in range(self.depth)])

    def _finish(self):
        if self._compile_blocks:
            for block in self.blocks:
                block.compile(dynamic=False)  # nn.Module.compile: in place, state_dict keys unchanged

    def count_cross_attention(self) -> int:
        """Modules that read the text tokens (cross-attention or joint blocks); 0 means text would be ignored."""
        return sum(1 for m in self.modules() if isinstance(m, (CrossAttention, JointBlock)))

    def _cached(self, key, make):
        if key not in self._pos_cache:
            self._pos_cache = {key: make()}  # one entry: shapes rarely change during a run
        return self._pos_cache[key]

    def _run_blocks(self, x, emb, context, context_mask, rope):
        joint = self.text_mode == "joint"
        if joint:
            context = self.context_embed(context.to(x.dtype)) if context is not None else None
        for block in self.blocks:
            args = (x, emb, context, context_mask, rope)
            if self.checkpoint_activations and torch.is_grad_enabled():
                out = checkpoint(block, *args, use_reentrant=False)
            else:
                out = block(*args)
            x, context = out if joint else (out, context)
        return x


class DiT(_TransformerBase):
    """Image diffusion transformer (DiT/SiT) for ``B x C x H x W`` inputs, pixels or latents.

    ``sample_shape`` (C, H, W) fixes the channels and checks that ``patch_size`` divides the image at build time;
    other sizes divisible by the patch also run (the positions are computed per grid). ``size`` picks a preset
    (``PRESETS``); ``depth`` / ``hidden_dim`` / ``num_heads`` override it.
    """

    def __init__(
        self,
        sample_shape: Sequence[int] = (4, 32, 32),
        out_channels: int | None = None,
        size: str = "S",
        patch_size: int = 2,
        depth: int | None = None,
        hidden_dim: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        pos_embed: str = "sincos",
        text_mode: str = "cross",
        fused_qkv: bool = True,
        checkpoint_activations: bool = False,
        compile_blocks: bool = False,
        freq_dim: int = 256,
        cond_dim: int = 0,
        context_dim: int | None = None,
        interval_input: bool = False,
        guidance_input: bool = False,
    ):
        super().__init__()
        if len(sample_shape) != 3:
            raise ConfigError(
                f"DiT takes images C x H x W, but the data's sample shape is {list(sample_shape)} "
                "(videos: model=video_dit)"
            )
        c, h, w = (int(s) for s in sample_shape)
        if patch_size < 1 or h % patch_size or w % patch_size:
            raise ConfigError(
                f"model.net.patch_size={patch_size} does not divide the image size {h}x{w}: choose a "
                "patch size that divides both sides (or change the data's image size)"
            )
        self._setup(
            size,
            depth,
            hidden_dim,
            num_heads,
            mlp_ratio,
            pos_embed,
            text_mode,
            fused_qkv,
            checkpoint_activations,
            compile_blocks,
            freq_dim,
            cond_dim,
            context_dim,
            interval_input,
            guidance_input,
        )
        self.in_channels, self.out_channels, self.patch = c, out_channels or c, int(patch_size)
        d = self.hidden_dim
        self.patch_embed = nn.Conv2d(c, d, self.patch, stride=self.patch)
        self.blocks = self._make_blocks(DiTBlock, context_dim)
        self.final = FinalLayer(d, self.patch * self.patch * self.out_channels)
        self._init_weights()
        self._finish()

    def _positions(self, gh: int, gw: int, device):
        if self.pos_embed == "rope":
            return None, self._cached(
                ("rope", gh, gw, str(device)), lambda: rope_tables((gh, gw), self.hidden_dim // self.num_heads, device)
            )
        table = self._cached(("sincos", gh, gw, str(device)), lambda: sincos_grid((gh, gw), self.hidden_dim, device))
        return table, None

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
        b, c, h, w = x.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"DiT: patch_size={p} does not divide the input size {h}x{w}")
        gh, gw = h // p, w // p
        emb = self.embed(t, cond, interval, guidance_scale)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # B x (gh*gw) x D
        table, rope = self._positions(gh, gw, x.device)
        if table is not None:
            tokens = tokens + table.to(tokens.dtype)
        out = self.final(self._run_blocks(tokens, emb, context, context_mask, rope), emb)
        out = out.reshape(b, gh, gw, p, p, self.out_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, self.out_channels, h, w)


class VideoDiT(_TransformerBase):
    """Space-time diffusion transformer for ``B x C x T x H x W`` videos (pixels or latents).

    Tokens are ``tubelet_size x patch_size x patch_size`` tubelets. ``attention="factorised"`` alternates attention
    within frames and across frames in every block (cost linear in T); ``"full"`` attends over all tokens (quadratic
    in T*H*W; needed for joint text attention, which joins the text to the whole clip). Temporal positions cover any
    number of frames up to ``max_frames``; more fail with a message naming both numbers.
    """

    def __init__(
        self,
        sample_shape: Sequence[int] = (3, 16, 32, 32),
        out_channels: int | None = None,
        size: str = "S",
        patch_size: int = 2,
        tubelet_size: int = 1,
        max_frames: int = 32,
        attention: str = "factorised",
        depth: int | None = None,
        hidden_dim: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        pos_embed: str = "sincos",
        text_mode: str = "cross",
        fused_qkv: bool = True,
        checkpoint_activations: bool = False,
        compile_blocks: bool = False,
        freq_dim: int = 256,
        cond_dim: int = 0,
        context_dim: int | None = None,
        interval_input: bool = False,
        guidance_input: bool = False,
    ):
        super().__init__()
        if len(sample_shape) != 4:
            raise ConfigError(
                f"VideoDiT takes videos C x T x H x W, but the data's sample shape is "
                f"{list(sample_shape)} (images: model=dit)"
            )
        if attention not in VIDEO_ATTENTION:
            raise ConfigError(f"model.net.attention={attention!r}: choose one of {', '.join(VIDEO_ATTENTION)}")
        if context_dim and text_mode == "joint" and attention != "full":
            raise ConfigError(
                "model.net.text_mode=joint joins the text to the whole clip: it needs "
                "model.net.attention=full (or use text_mode=cross)"
            )
        c, nt, h, w = (int(s) for s in sample_shape)
        self.patch, self.tubelet, self.max_frames = int(patch_size), int(tubelet_size), int(max_frames)
        if self.patch < 1 or h % self.patch or w % self.patch:
            raise ConfigError(
                f"model.net.patch_size={patch_size} does not divide the frame size {h}x{w}: choose a "
                "patch size that divides both sides"
            )
        self.check_frames(nt)
        self._setup(
            size,
            depth,
            hidden_dim,
            num_heads,
            mlp_ratio,
            pos_embed,
            text_mode,
            fused_qkv,
            checkpoint_activations,
            compile_blocks,
            freq_dim,
            cond_dim,
            context_dim,
            interval_input,
            guidance_input,
        )
        self.attention = attention
        self.in_channels, self.out_channels = c, out_channels or c
        d = self.hidden_dim
        kernel = (self.tubelet, self.patch, self.patch)
        self.patch_embed = nn.Conv3d(c, d, kernel, stride=kernel)
        self.blocks = self._make_blocks(DiTBlock if attention == "full" else SpaceTimeDiTBlock, context_dim)
        self.final = FinalLayer(d, self.tubelet * self.patch * self.patch * self.out_channels)
        self._init_weights()
        self._finish()

    def check_frames(self, frames: int) -> None:
        """Fail unless ``frames`` is a multiple of the tubelet and within the temporal positions."""
        if frames > self.max_frames:
            raise ConfigError(
                f"the clips have {frames} frames but model.net.max_frames={self.max_frames}: raise "
                "model.net.max_frames or use shorter clips (datamodule.num_frames)"
            )
        if frames % self.tubelet:
            raise ConfigError(
                f"the clips have {frames} frames, not a multiple of model.net.tubelet_size={self.tubelet}"
            )

    def _positions(self, gt: int, gh: int, gw: int, device):
        head = self.hidden_dim // self.num_heads
        if self.pos_embed == "rope":
            if self.attention == "factorised":
                return None, self._cached(
                    ("rope", gt, gh, gw, str(device)),
                    lambda: (rope_tables((gh, gw), head, device), rope_tables((gt,), head, device)),
                )
            return None, self._cached(
                ("rope", gt, gh, gw, str(device)), lambda: rope_tables((gt, gh, gw), head, device)
            )
        return self._cached(
            ("sincos", gt, gh, gw, str(device)), lambda: sincos_grid((gt, gh, gw), self.hidden_dim, device)
        ), None

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
        if x.ndim != 5:
            raise ValueError(f"VideoDiT expects videos B x C x T x H x W, got shape {tuple(x.shape)}")
        b, c, nt, h, w = x.shape
        try:
            self.check_frames(nt)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        if h % self.patch or w % self.patch:
            raise ValueError(f"VideoDiT: patch_size={self.patch} does not divide the frame size {h}x{w}")
        gt, gh, gw = nt // self.tubelet, h // self.patch, w // self.patch
        emb = self.embed(t, cond, interval, guidance_scale)
        tokens = self.patch_embed(x).permute(0, 2, 3, 4, 1)  # B x gt x gh x gw x D
        table, rope = self._positions(gt, gh, gw, x.device)
        if table is not None:
            tokens = tokens + table.view(gt, gh, gw, -1).to(tokens.dtype)
        shape = (
            (b, gt, gh * gw, self.hidden_dim)
            if self.attention == "factorised" and self.text_mode != "joint"
            else (b, gt * gh * gw, self.hidden_dim)
        )
        out = self.final(self._run_blocks(tokens.reshape(shape), emb, context, context_mask, rope), emb)
        out = out.reshape(b, gt, gh, gw, self.tubelet, self.patch, self.patch, self.out_channels)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.out_channels, nt, h, w)
