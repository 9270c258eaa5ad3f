"""Text conditioning: a frozen pretrained text encoder plus small trainable projections.

``TextConditioner(encoder="minilm")`` reads ``batch["text"]`` (list[str]) and returns
- ``context``: the encoder's token states (``B x max_length x context_dim``), optionally through a trainable linear
  map to ``context_proj_dim``; ``context_dim`` is the encoder's hidden size unless projected (never set by hand);
- ``context_mask``: True on real tokens (None when ``use_context_mask=False``, i.e. attend to padding too, as
  Stable Diffusion does with CLIP);
- ``vector``: a trainable linear projection of the pooled embedding (CLIP: end-of-text state; others: masked mean)
  to ``vector_dim`` (null: the pooled width; 0: no vector).
The empty prompt "" is the null condition for classifier-free guidance.

The encoder is held in ``Frozen``: not in ``state_dict``, not trained, shared (not copied) by ``copy.deepcopy`` /
the EMA copy, and moved to the device of this module on first use. Prompts found in a ``PromptTable`` (fixed prompt
sets: class prompts, captions) are looked up; others (free-form prompts at sampling time) are encoded on the fly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from difflab.conditioning.base import Conditioner, cond_dict
from difflab.conditioning.pooling import AttentionPool
from difflab.conditioning.prompt_table import PromptTable, build_prompt_table, load_prompt_table
from difflab.conditioning.text_encoders import TextEncoder, check_prompts, load_text_encoder
from difflab.utils.errors import ConfigError
from difflab.utils.frozen import Frozen

NULL_PROMPT = ""


class _SharedState:
    """Lazily filled state (prompt table, cached null embedding) shared by a conditioner and its deep copies (EMA),
    so a table prepared by either is prepared for both and is held in memory once."""

    def __init__(self):
        self.table: PromptTable | None = None
        self.ready = False
        self.null_cache: dict[str, tuple[torch.Tensor, ...]] = {}

    def __deepcopy__(self, memo):
        return self


class TextConditioner(Conditioner):
    """Frozen text encoder -> (vector, context, context_mask) for a text-conditioned denoiser.

    Args:
        encoder: Hub id, local save_pretrained directory, ``minilm``, or an already loaded ``TextEncoder``.
        max_length: tokens per prompt (default 77, capped by the model).
        kind: "auto", "clip" or "auto_model" (see ``load_text_encoder``).
        vector_dim: width of the projected pooled vector; null = pooled width; 0 = no vector.
        context_proj_dim: null keeps the encoder's token width; an int adds a trainable linear map to it.
        use_context_mask: return the padding mask for cross-attention (False: attend to all ``max_length`` tokens).
        table_path: ``.pt`` prompt table; loaded (and checked for staleness) if it exists, else built from
            ``prompts`` on first use and saved there.
        prompts: the fixed prompt set (e.g. the datamodule's class prompts); "" is always added.
        dtype: optional encoder weight dtype ("float16" on GPU halves its memory).
        encode_batch_size: prompts per encoder call when building tables.
        pooling: "encoder" uses the encoder's pooled output (MiniLM: masked token mean; CLIP: its pooler) for the
            vector; "attention" learns which tokens to weight (``AttentionPool``), for prompts that differ in one
            word that matters (directions, counts).
    """

    batch_key = "text"

    def __init__(
        self,
        encoder: str | TextEncoder = "minilm",
        max_length: int | None = None,
        kind: str = "auto",
        vector_dim: int | None = None,
        context_proj_dim: int | None = None,
        use_context_mask: bool = True,
        table_path: str | None = None,
        prompts: list[str] | None = None,
        dtype: str | None = None,
        encode_batch_size: int = 128,
        pooling: str = "encoder",
    ):
        super().__init__()
        if pooling not in ("encoder", "attention"):
            raise ConfigError(f"conditioning.pooling must be 'encoder' or 'attention'; got {pooling!r}")
        enc = encoder if isinstance(encoder, TextEncoder) else load_text_encoder(encoder, kind, max_length, dtype)
        if isinstance(encoder, TextEncoder) and max_length is not None and int(max_length) != enc.max_length:
            raise ConfigError(f"max_length={max_length} differs from the given encoder's max_length={enc.max_length}")
        self._encoder = Frozen(enc)
        self.encoder_name = enc.name
        self.max_length = enc.max_length
        self.pooled_dim = enc.pooled_dim
        self.use_context_mask = bool(use_context_mask)
        self.encode_batch_size = int(encode_batch_size)

        if vector_dim is not None and int(vector_dim) < 0:
            raise ConfigError(f"vector_dim must be >= 0 or null; got {vector_dim}")
        self.vector_dim = enc.pooled_dim if vector_dim is None else int(vector_dim)
        self.pooling = pooling
        self.attention_pool = AttentionPool(enc.hidden_size) if pooling == "attention" and self.vector_dim > 0 else None
        pooled_in = enc.hidden_size if self.attention_pool is not None else enc.pooled_dim
        self.vector_proj = nn.Linear(pooled_in, self.vector_dim) if self.vector_dim > 0 else None
        if context_proj_dim is not None and int(context_proj_dim) <= 0:
            raise ConfigError(f"context_proj_dim must be a positive int or null; got {context_proj_dim}")
        self.context_proj = None if context_proj_dim is None else nn.Linear(enc.hidden_size, int(context_proj_dim))
        self.context_dim = enc.hidden_size if context_proj_dim is None else int(context_proj_dim)
        # Zero-size, non-persistent buffer: follows .to()/.cuda() so we know where to run the encoder, even when
        # there are no trainable parameters (vector_dim=0, no context projection).
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

        self.table_path = None if table_path is None else str(table_path)
        self.prompts = None if prompts is None else check_prompts(prompts)
        self._state = _SharedState()

    # ------------------------------------------------------------------------------------------------ interface
    @property
    def encoder(self) -> TextEncoder:
        """The frozen text encoder (not a registered submodule)."""
        return self._encoder.module

    @property
    def table(self) -> PromptTable | None:
        """The prompt table in use (None before ``prepare_table`` / first forward, or without prompts)."""
        return self._state.table

    def null_like(self, raw) -> list[str]:
        """Empty prompts, one per entry of ``raw``."""
        return [NULL_PROMPT] * len(raw)

    def forward(self, raw) -> dict:
        """Prompts -> dict(vector, context, context_mask) on this module's device."""
        prompts = check_prompts(raw)
        tokens, mask, pooled = self.embed(prompts)
        if self.attention_pool is not None:
            pooled = self.attention_pool(tokens, mask)
        vector = self.vector_proj(pooled) if self.vector_proj is not None else None
        context = self.context_proj(tokens) if self.context_proj is not None else tokens
        return cond_dict(vector=vector, context=context, context_mask=mask if self.use_context_mask else None)

    def describe(self) -> str:
        table = f", table={self.table_path} ({len(self.table)} prompts)" if self.table is not None else ""
        return (
            f"TextConditioner(encoder={self.encoder_name}, max_length={self.max_length}, vector_dim="
            f"{self.vector_dim}, pooling={self.pooling}, context_dim={self.context_dim}{table})"
        )

    # ------------------------------------------------------------------------------------------------- tables
    def prepare_table(self, prompts: list[str] | None = None) -> PromptTable | None:
        """Load or build the prompt table for ``prompts`` (default: the configured ones); "" is always included.

        With ``table_path``: an existing file is loaded and refused if stale (ConfigError), a missing one is built
        and saved. Without it the table lives in memory only. Returns None when there is nothing to tabulate.
        """
        if prompts is not None:
            self.prompts = check_prompts(prompts)
        self._state.ready = True
        if self.prompts is None and self.table_path is None:
            return None
        enc = self._ensure_encoder()
        wanted = None if self.prompts is None else list(self.prompts) + [NULL_PROMPT]
        if self.table_path is not None and Path(self.table_path).is_file():
            self._state.table = load_prompt_table(self.table_path, enc.name, wanted, enc.max_length, enc.fingerprint())
        elif wanted is None:
            raise ConfigError(
                f"prompt table {self.table_path} does not exist and no prompts were given to build it: "
                "set conditioning.prompts, call prepare_table(prompts), or set table_path: null"
            )
        else:
            self._state.table = build_prompt_table(enc, wanted, self.table_path, self.encode_batch_size)
        return self._state.table

    # ------------------------------------------------------------------------------------------------ encoding
    def _ensure_encoder(self) -> TextEncoder:
        """The encoder, moved to this module's device if it is elsewhere (first use, or after .to())."""
        device = self._anchor.device
        if self._encoder.device != device:
            self._encoder.to(device)
        return self.encoder

    def embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder-space ``(tokens, mask, pooled)`` for prompts: table rows where possible, else fresh encodings."""
        if not self._state.ready:
            self.prepare_table()
        enc = self._ensure_encoder()
        device, dtype = self._anchor.device, self._anchor.dtype
        table = self.table
        if table is not None and all(p in table.index for p in prompts):  # fast path: one gather, one copy
            t, m, p = table.lookup(prompts)
            return t.to(device, dtype, non_blocking=True), m.to(device, non_blocking=True), p.to(device, dtype)
        uniq = list(dict.fromkeys(prompts))
        row = {p: i for i, p in enumerate(uniq)}
        in_table = [p for p in uniq if table is not None and p in table.index]
        fresh = [p for p in uniq if (table is None or p not in table.index) and p != NULL_PROMPT]
        n, L = len(uniq), self.max_length
        tokens = torch.empty(n, L, enc.hidden_size, device=device, dtype=dtype)
        mask = torch.empty(n, L, device=device, dtype=torch.bool)
        pooled = torch.empty(n, enc.pooled_dim, device=device, dtype=dtype)

        def put(names, t, m, p):
            idx = torch.tensor([row[q] for q in names], device=device)
            tokens[idx], mask[idx], pooled[idx] = t.to(device, dtype), m.to(device), p.to(device, dtype)

        if in_table:
            put(in_table, *table.lookup(in_table))
        if fresh:
            put(fresh, *enc(fresh))
        if NULL_PROMPT in row and NULL_PROMPT not in in_table:
            put([NULL_PROMPT], *self._null_embedding(enc))
        if n == len(prompts) and uniq == prompts:
            return tokens, mask, pooled
        idx = torch.tensor([row[p] for p in prompts], device=device)
        return tokens[idx], mask[idx], pooled[idx]

    def _null_embedding(self, enc: TextEncoder) -> tuple[torch.Tensor, ...]:
        """Encoding of "" (cached per device: CFG dropout asks for it every step)."""
        key = str(enc.device)
        cache = self._state.null_cache
        if key not in cache:
            cache[key] = enc([NULL_PROMPT])
        return cache[key]
