"""Learning-rate schedules stepped per optimizer step: linear warm-up then cosine decay over the training budget.

The budget is ``trainer.max_steps`` (progress = step / total), or, for a run bounded only by ``trainer.max_time``
(``max_steps: -1``), the wall-clock budget (progress = time used / max_time, read from Lightning's ``Timer``), so a
time-budgeted run decays its learning rate over exactly the time it has instead of stopping mid-schedule.
"""
from __future__ import annotations

import math
from typing import Callable


def warmup_cosine_progress(progress: float, warmup_fraction: float, start_factor: float = 0.01,
                           final_fraction: float = 0.1) -> float:
    """LR multiplier at ``progress`` in [0, 1] of the budget: linear warm-up from ``start_factor`` to 1 over the
    first ``warmup_fraction``, then cosine decay to ``final_fraction``."""
    if warmup_fraction > 0 and progress < warmup_fraction:
        return start_factor + (1 - start_factor) * progress / warmup_fraction
    decay = min(1.0, max(0.0, (progress - warmup_fraction) / max(1e-12, 1 - warmup_fraction)))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * decay))


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, start_factor: float = 0.01,
                  final_fraction: float = 0.1) -> float:
    """LR multiplier at ``step`` of a ``total_steps`` budget with ``warmup_steps`` of linear warm-up."""
    total = max(1, total_steps)
    return warmup_cosine_progress(min(1.0, step / total), warmup_steps / total, start_factor, final_fraction)


def resolve_steps(value: float | int, total_steps: int) -> int:
    """A step count given either as an int or as a fraction (< 1) of the total."""
    return int(round(value * total_steps)) if isinstance(value, float) and value < 1 else int(value)


def time_progress(timer) -> Callable[[], float]:
    """Fraction of a Lightning ``Timer``'s training budget used so far (0 before training starts)."""

    def progress() -> float:
        elapsed, remaining = timer.time_elapsed("train"), timer.time_remaining("train")
        total = elapsed + (remaining or 0.0)
        return min(1.0, elapsed / total) if total > 0 else 0.0

    return progress
