"""The training progress bar labelled with the run's budget: epoch (of max_epochs when it bounds the run), optimizer
step of max_steps, and wall-clock of max_time, instead of Lightning's ``Epoch 0/-2`` when max_epochs is -1."""

from __future__ import annotations

import datetime
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar, Timer


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss (rounded)."""
    return str(datetime.timedelta(seconds=round(max(seconds, 0))))


def budget_text(trainer: Any) -> str:
    """``Epoch 3 · step 120/2000 · 0:01:23/0:06:00``: each bound the trainer has, with how much of it is used."""
    epochs = trainer.max_epochs
    parts = [f"Epoch {trainer.current_epoch}" + (f"/{epochs - 1}" if epochs is not None and epochs > 0 else "")]
    steps = trainer.max_steps
    parts.append(f"step {trainer.global_step}" + (f"/{steps}" if steps is not None and steps > 0 else ""))
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    if timer is not None:
        elapsed = timer.time_elapsed("train")
        remaining = timer.time_remaining("train")
        parts.append(clock(elapsed) + ("" if remaining is None else f"/{clock(elapsed + remaining)}"))
    return " · ".join(parts)


class BudgetProgressBar(RichProgressBar):
    """Lightning's rich bar (one task per epoch) whose label is ``budget_text``, refreshed at every batch."""

    def _label(self, trainer) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=budget_text(trainer))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._label(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._label(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
