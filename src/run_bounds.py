"""Which bound ended a training run: a signal, max_steps, max_time, early stopping or max_epochs, named in one log
line at the end of fit (a time-budgeted run that stopped before its step budget says so)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import EarlyStopping, Timer

from difflab.ops.signals import find_shutdown


def _callback(trainer: Any, kind: type):
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)


def stopping_bound(trainer: Any) -> str:
    """The bound that ended ``trainer.fit``, in words with its value; checked in the order that decides a tie."""
    shutdown = find_shutdown(trainer)
    if (shutdown is not None and shutdown.stopped) or trainer.interrupted:
        received = shutdown.received.name if shutdown is not None and shutdown.received is not None else None
        return f"a signal ({received or 'interrupt'}, step {trainer.global_step})"
    steps = trainer.max_steps
    if steps is not None and steps > 0 and trainer.global_step >= steps:
        return f"max_steps ({trainer.global_step} of {steps} steps)"
    timer = _callback(trainer, Timer)
    remaining = timer.time_remaining("train") if timer is not None else None
    if remaining is not None and remaining <= 0:
        return f"max_time ({timer.time_elapsed('train'):.0f} s; step {trainer.global_step}" + (
            f" of {steps})" if steps is not None and steps > 0 else ")"
        )
    early = _callback(trainer, EarlyStopping)
    if early is not None and early.stopped_epoch > 0:
        return f"early stopping on {early.monitor} (step {trainer.global_step})"
    epochs = trainer.max_epochs
    if epochs is not None and epochs > 0 and trainer.current_epoch >= epochs:
        return f"max_epochs ({epochs} epochs, step {trainer.global_step})"
    return f"the end of the data or a callback (step {trainer.global_step}; no configured bound reached)"
