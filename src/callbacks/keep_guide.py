"""Keeps a weaker copy of the model being trained, for autoguidance with ``guidance.guide_ckpt=kept``.

Autoguidance (Karras et al. 2024) guides a model with a weaker version of itself; EDM2 trains a smaller model for a
shorter time. A run's own EMA weights from early in training are such a model and cost nothing to train: this
callback copies them once, when ``guidance.keep_at`` of the training budget is used (steps or wall-clock,
whichever is further along, as the LR schedule counts), hands them to the guidance object, and writes them into
every later checkpoint (``kept_guide``; exports carry them too), so ``sample.py``, the class grid and the sample
metrics guide with them and with no extra argument. It does nothing unless the guidance asks for a kept guide.
Cost: one more copy of the module's weights in memory and in each checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

from difflab.checkpoints import KEPT_GUIDE_KEY, restore_kept_guide
from difflab.ops.ema_weights import ema_weights
from difflab.ops.fsdp import is_sharding
from difflab.optim.lr_schedules import budget_progress, trainer_budget
from difflab.utils.errors import ConfigError

log = logging.getLogger(__name__)


def kept_guidance(pl_module: Any) -> Any:
    """The module's guidance when it guides with a kept guide, else None."""
    guidance = getattr(getattr(pl_module, "diffusion", None), "guidance", None)
    return guidance if getattr(guidance, "uses_kept_guide", False) else None


class KeepGuide(L.Callback):
    """Copy the EMA weights at ``guidance.keep_at`` of the budget into the guidance (and every later checkpoint)."""

    def __init__(self) -> None:
        self._progress: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if kept_guidance(pl_module) is not None and is_sharding(trainer):
            raise ConfigError(
                "guidance.guide_ckpt=kept is not supported with trainer=fsdp yet (the guide would be a sharded copy); "
                "guide with a checkpoint instead: guidance=autoguidance guidance.guide_ckpt=<an earlier checkpoint>"
            )
        if kept_guidance(pl_module) is not None:
            total, used = trainer_budget(trainer)
            self._progress = lambda step: budget_progress(step, total, used)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        guidance = kept_guidance(pl_module)
        if guidance is None or guidance.kept_step is not None or self._progress is None:
            return
        due = self._progress(trainer.global_step) >= guidance.keep_at
        if trainer.world_size > 1:  # the wall-clock differs between ranks: rank 0 decides for all
            due = trainer.strategy.broadcast(due, src=0)
        if due:
            with ema_weights(trainer, pl_module) as module:
                guidance.keep(module.state_dict(), trainer.global_step, like=pl_module)
            log.info(
                "kept the guide for autoguidance: EMA weights at step %d (%.0f%% of the budget)",
                trainer.global_step,
                100 * guidance.keep_at,
            )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        guidance = kept_guidance(pl_module)
        state = None if guidance is None else guidance.kept_state()
        if state is not None:
            checkpoint[KEPT_GUIDE_KEY] = state

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        restore_kept_guide(pl_module, checkpoint.get(KEPT_GUIDE_KEY), "the resumed checkpoint")
