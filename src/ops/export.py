"""Export a checkpoint's EMA weights as safetensors plus the run config, for sampling and sharing without pickle.

Layout of ``out_dir``: ``model.safetensors`` (EMA weights; header metadata: format, step, source, the run config as
JSON), ``config.yaml`` (the same run config, readable) and ``config.json`` (the model section only). ``sample.py
ckpt_path=<out_dir or out_dir/model.safetensors>`` samples from it; ``init_from=`` fine-tunes from it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from difflab.checkpoints import (
    EXPORT_CONFIG,
    EXPORT_FORMAT,
    EXPORT_WEIGHTS,
    KEPT_GUIDE_KEY,
    drop_compiled_aliases,
    load_weights,
)
from difflab.ops.atomic import atomic_write
from difflab.trust import check_config

log = logging.getLogger(__name__)


def _tensors_for_safetensors(state_dict: dict) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (safetensors refuses shared or strided storage); non-tensor entries dropped."""
    return {
        k: v.detach().cpu().contiguous().clone()
        for k, v in drop_compiled_aliases(state_dict).items()
        if torch.is_tensor(v)
    }


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, weights: str = "ema") -> dict[str, Path]:
    """Write ``out_dir/model.safetensors`` + ``config.yaml`` + ``config.json`` from a checkpoint; returns the paths.

    ``weights``: ``ema`` (default; equals the raw weights when training ran without EMA) or ``raw``.
    """
    from safetensors.torch import save_file

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights={weights!r}: use ema or raw")
    src = load_weights(ckpt_path)
    config = src["config"]
    check_config(config, ckpt_path)  # nothing the loaders would refuse is copied into a file that looks safe
    tensors = _tensors_for_safetensors(src[weights])
    kept = src.get(KEPT_GUIDE_KEY)
    if kept is not None:  # the kept autoguidance guide travels with the weights it guides
        tensors.update({f"{KEPT_GUIDE_KEY}.{k}": v for k, v in _tensors_for_safetensors(kept["state_dict"]).items()})
    metadata = {
        "format": EXPORT_FORMAT,
        "weights": weights,
        "global_step": str(src.get("step")),
        "source": str(Path(ckpt_path).resolve()),
        "difflab_config": json.dumps(config),
        **({"kept_guide_step": str(kept["step"])} if kept is not None else {}),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "weights": out_dir / EXPORT_WEIGHTS,
        "config": out_dir / EXPORT_CONFIG,
        "model_json": out_dir / "config.json",
    }
    atomic_write(paths["weights"], lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write(paths["config"], lambda tmp: tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(config))))
    atomic_write(paths["model_json"], lambda tmp: tmp.write_text(json.dumps(config.get("model", {}), indent=1)))
    n = sum(t.numel() for t in tensors.values())
    log.info(
        "exported %s weights (%d tensors, %.2fM values, step %s) to %s",
        weights,
        len(tensors),
        n / 1e6,
        src.get("step"),
        out_dir,
    )
    return paths
