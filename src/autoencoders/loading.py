"""Build, load and identify autoencoders.

- ``build_autoencoder(cfg)``: a trainable module from an ``autoencoder/*.yaml`` config (fresh, or initialised from
  ``ckpt_path`` to fine-tune).
- ``load_autoencoder(cfg_or_spec)``: a frozen eval module + its identity, from a difflab autoencoder checkpoint
  (``.ckpt`` written by ``AutoencoderModule``), a diffusers spec, or a config. This is what latent diffusion and
  ``encode_latents.py`` use.
- ``autoencoder_identity(module)``: {class, config, hash}; the hash covers the class, the behaviour-relevant config
  and every state-dict tensor (name, dtype, shape, bytes), so a latent cache can tell whether the autoencoder given
  later is the one that produced it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.checkpoints import migrate_config
from difflab.trust import build_stored
from difflab.utils.errors import CheckpointError, ConfigError

CHECKPOINT_KIND = "autoencoder"
STATE_PREFIX = "autoencoder."  # AutoencoderModule holds the model as ``self.autoencoder``


def class_path(obj_or_cls: Any) -> str:
    """Importable dotted path of a class (or of an object's class)."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over the state dict in sorted key order: name, dtype, shape and raw bytes of every tensor."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def autoencoder_identity(module: nn.Module) -> dict:
    """{class, config, hash} of an autoencoder.

    ``config`` is the module's plain constructor-argument dict (``module.config``). The hash covers the class, the
    config minus the keys listed in ``module.hash_exclude`` (locations such as a download id or a local path, which
    do not change what the model computes), ``module.hash_extra`` (behaviour not in the config, e.g. a loaded
    model's own config file) and the weights.
    """
    config = dict(getattr(module, "config", {}) or {})
    exclude = set(getattr(module, "hash_exclude", ()))
    behaviour = {k: v for k, v in config.items() if k not in exclude}
    behaviour["__extra__"] = dict(getattr(module, "hash_extra", {}) or {})
    h = hashlib.sha256()
    h.update(class_path(module).encode())
    h.update(json.dumps(behaviour, sort_keys=True, default=str).encode())
    h.update(state_dict_sha256(module).encode())
    return {"class": class_path(module), "config": config, "hash": h.hexdigest()}


def known_identity(autoencoder: Any) -> dict:
    """The identity recorded when ``load_autoencoder`` loaded this module, else computed now.

    Unwraps ``difflab.utils.frozen.Frozen`` holders. Using the load-time identity keeps it valid after the caller casts
    the module (e.g. to bf16), which would change a freshly computed hash.
    """
    module = getattr(autoencoder, "module", autoencoder)
    ident = getattr(module, "difflab_identity", None)
    if ident is not None:
        return ident
    if hasattr(module, "identity"):
        return module.identity()
    return autoencoder_identity(module)


def to_plain(cfg: Any) -> Any:
    """DictConfig/ListConfig -> plain containers (resolved); other values unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _instantiate(cfg: dict, source: Any = "the autoencoder config") -> nn.Module:
    """Build ``cfg['_target_'](**rest)`` through the trust gate (``difflab.trust``): a config read from a checkpoint or
    a latent cache's manifest names a difflab class, or the user passed ``trust_stored_code=true``."""

    target = cfg.get("_target_")
    if not isinstance(target, str) or not target:
        raise ConfigError(f"autoencoder config needs a _target_ naming a difflab class (difflab....); got {target!r}")
    return build_stored(cfg, source, where="autoencoder")


def read_autoencoder_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(config, autoencoder state dict) from a ``.ckpt`` written by ``AutoencoderModule`` (weights_only load)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"autoencoder checkpoint not found: {path} (set autoencoder.ckpt_path to a .ckpt "
            f"written by AutoencoderModule)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read autoencoder checkpoint {path}: {_first_line(e)}") from e
    meta = ckpt.get("difflab") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or meta.get("kind") != CHECKPOINT_KIND or not isinstance(meta.get("config"), dict):
        kind = meta.get("kind") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"{path} is not a difflab autoencoder checkpoint (checkpoint['difflab']['kind'] is "
            f"{kind!r}, expected 'autoencoder'); give a .ckpt written by AutoencoderModule"
        )
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"autoencoder checkpoint {path} has no state_dict")
    sd = {k[len(STATE_PREFIX) :]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}

    return migrate_config(dict(meta["config"])), sd


def load_autoencoder_checkpoint(path: str | Path) -> nn.Module:
    """Rebuild the autoencoder stored in an ``AutoencoderModule`` checkpoint (trainable, weights loaded)."""
    config, sd = read_autoencoder_checkpoint(path)
    try:
        model = _instantiate(config, path)
    except ConfigError as e:
        raise CheckpointError(f"autoencoder checkpoint {path}: {e}") from e
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"autoencoder checkpoint {path} does not match {config['_target_']}: missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    return model


def _normalise_spec(cfg_or_spec: Any) -> dict | None:
    """A spec as a plain dict: {'ckpt_path': ...} or a {'_target_': ..., ...} config; None for no autoencoder."""
    spec = to_plain(cfg_or_spec)
    if spec is None or (isinstance(spec, str) and spec.lower() in ("", "none", "null")):
        return None
    if isinstance(spec, (str, Path)):
        p = Path(spec).expanduser()
        if p.suffix == ".ckpt" or p.is_file():
            return {"ckpt_path": str(p)}
        return {"_target_": "difflab.autoencoders.diffusers_kl.DiffusersKL", "pretrained": str(spec)}
    if isinstance(spec, Mapping):
        return dict(spec) or None  # configs/autoencoder/none.yaml composes to an empty mapping
    raise ConfigError(f"autoencoder spec must be a path, a diffusers id or a config mapping; got {type(spec).__name__}")


def build_autoencoder(cfg_or_spec: Any) -> nn.Module | None:
    """A trainable autoencoder: from the checkpoint in ``ckpt_path`` if set (fine-tuning), else freshly built."""
    spec = _normalise_spec(cfg_or_spec)
    if spec is None:
        return None
    ckpt = spec.get("ckpt_path")
    if ckpt:
        return load_autoencoder_checkpoint(ckpt)
    return _instantiate({k: v for k, v in spec.items() if k != "ckpt_path"})


def load_autoencoder(
    cfg_or_spec: Any, require_weights: bool = True, source: Any = "the autoencoder config"
) -> tuple[nn.Module | None, dict | None]:
    """(frozen eval autoencoder, identity) from a checkpoint path, a diffusers id/path or a config mapping.

    A config whose class needs trained weights (``KLAutoencoder``) must name ``ckpt_path`` unless
    ``require_weights=False``. The identity gains a ``spec`` entry (how to reload it) and is attached to the module
    as ``difflab_identity``. Returns (None, None) for no autoencoder (``autoencoder=none``).
    """
    spec = _normalise_spec(cfg_or_spec)
    if spec is None:
        return None, None
    ckpt = spec.get("ckpt_path")
    if ckpt:
        model = load_autoencoder_checkpoint(ckpt)
        target = spec.get("_target_")
        if target and target != class_path(model):
            raise ConfigError(
                f"autoencoder config names {target} but {ckpt} holds a {class_path(model)}; fix "
                f"autoencoder=... or autoencoder.ckpt_path"
            )
        reload_spec = {"ckpt_path": str(Path(ckpt).expanduser().resolve())}
    else:
        target = str(spec.get("_target_", ""))
        if require_weights and target.endswith("kl_vae.KLAutoencoder"):
            raise ConfigError(
                "autoencoder.ckpt_path is null: a KLAutoencoder needs trained weights; train one with "
                "AutoencoderModule and set autoencoder.ckpt_path=<run>/checkpoints/last.ckpt"
            )
        model = _instantiate({k: v for k, v in spec.items() if k != "ckpt_path"}, source)
        reload_spec = {k: v for k, v in spec.items() if k != "ckpt_path"}
    model.eval().requires_grad_(False)
    identity = dict(model.identity() if hasattr(model, "identity") else autoencoder_identity(model))
    identity["spec"] = reload_spec
    model.difflab_identity = identity
    return model, identity
