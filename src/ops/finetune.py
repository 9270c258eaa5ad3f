"""Fine-tuning: ``init_from=PATH`` starts a new run from another run's weights (and EMA), with a fresh optimizer,
LR schedule and step counter (unlike ``ckpt_path``, which resumes the old run).

``init_strict=true`` (default) fails on any missing / unexpected / shape-mismatched key; ``init_strict=false``
loads the tensors that match and prints the others as a table (e.g. a new class embedding, a wider output layer).
PATH may be a Lightning checkpoint or an export (directory or ``.safetensors``; exports hold EMA weights only).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch import nn

from difflab.checkpoints import format_key_table, load_state_dict_checked, load_weights
from difflab.ops.ema_weights import ema_provider

log = logging.getLogger(__name__)


def _ema_num_updates(ckpt: dict | None) -> int | None:
    """``num_updates`` of the EMA callback state in a Lightning checkpoint, if any."""
    for key, state in ((ckpt or {}).get("callbacks") or {}).items():
        if "EMA" in str(key) and isinstance(state, dict) and "num_updates" in state:
            return int(state["num_updates"])
    return None


def load_initial_weights(module: nn.Module, path: str, strict: bool = True) -> dict[str, Any]:
    """Load the raw weights of ``path`` into ``module``; returns the loaded weights (raw, ema, config ...) and the
    key report. Non-strict mismatches are printed as a table."""
    weights = load_weights(path)
    report = load_state_dict_checked(module, weights["raw"], path, strict=strict)
    if not strict:
        table = format_key_table(
            report, title=f"init_from={path} (init_strict=false): {len(report['loaded'])} tensors loaded; not loaded:\n"
        )
        print(table)
        log.info(table)
    weights["report"] = report
    return weights


class InitEMAWeights(L.Callback):
    """Puts the EMA weights of ``init_from`` into the EMA copy once the EMA callback has built it (setup).

    Must come after the EMA callback in the callback list (the training pipeline appends it last).
    """

    def __init__(self, ema_state: dict, strict: bool = True, num_updates: int | None = None, source: str = ""):
        self.ema_state, self.strict, self.num_updates, self.source = ema_state, strict, num_updates, source

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        provider = ema_provider(trainer)
        if provider is None:
            return
        provider.load_full_state(self.ema_state, strict=self.strict, source=self.source, num_updates=self.num_updates)
        log.info("EMA initialised from %s", self.source)
        self.ema_state = {}  # free the copy


def init_callbacks(module: nn.Module, path: str | None, strict: bool = True) -> list[L.Callback]:
    """Load ``path`` into ``module`` and return the callback that initialises the EMA copy (empty if no path)."""
    if not path:
        return []
    weights = load_initial_weights(module, path, strict=strict)
    log.info("initialised weights from %s (step %s)", path, weights.get("step"))
    return [
        InitEMAWeights(
            weights["ema"], strict=strict, num_updates=_ema_num_updates(weights.get("checkpoint")), source=str(path)
        )
    ]
