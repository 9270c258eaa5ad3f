"""Learning-rate schedules (the ``lr_schedule`` config group), stepped per optimizer step.

A schedule object is called with the optimizer and the trainer and returns Lightning's scheduler entry. One that
decays over the whole run (``warmup_cosine``) reads its budget from the trainer: ``trainer.max_steps`` (progress =
step / total), the wall-clock of ``trainer.max_time`` (progress = time used / max_time, read from Lightning's
``Timer``), or, with both, whichever is further along: it decays over exactly the run it gets, on a fast machine or a
slow one. ``linear_restarts`` decays over fixed periods of steps instead (a round-based method's rounds).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from typing import Callable, Sequence

from difflab.utils.errors import ConfigError


def warmup_cosine_progress(
    progress: float, warmup_fraction: float, start_factor: float = 0.01, final_fraction: float = 0.1
) -> float:
    """LR multiplier at ``progress`` in [0, 1] of the budget: linear warm-up from ``start_factor`` to 1 over the
    first ``warmup_fraction``, then cosine decay to ``final_fraction``."""
    if warmup_fraction > 0 and progress < warmup_fraction:
        return start_factor + (1 - start_factor) * progress / warmup_fraction
    decay = min(1.0, max(0.0, (progress - warmup_fraction) / max(1e-12, 1 - warmup_fraction)))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * decay))


def warmup_cosine(
    step: int, warmup_steps: int, total_steps: int, start_factor: float = 0.01, final_fraction: float = 0.1
) -> float:
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


def trainer_budget(trainer, budget: str = "auto") -> tuple[int | None, Callable[[], float] | None]:
    """A trainer's budget: its total optimizer steps (None when unbounded or ``budget="time"``) and a function giving
    the fraction of its ``max_time`` used (None without one, or with ``budget="steps"``)."""
    from lightning.pytorch.callbacks import Timer

    total = trainer.estimated_stepping_batches
    steps = max(1, int(total)) if math.isfinite(total) and budget != "time" else None
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None) if budget != "steps" else None
    return steps, (time_progress(timer) if timer is not None else None)


def budget_progress(step: int, total_steps: int | None, time_used: Callable[[], float] | None) -> float:
    """Fraction of the training budget used: of ``total_steps`` or of the wall-clock budget, whichever is further
    along, so the schedule ends where the run does, whichever bound stops it."""
    fractions = [min(1.0, step / max(1, total_steps))] if total_steps else []
    if time_used is not None:
        fractions.append(time_used())
    return max(fractions) if fractions else 0.0


class WarmupCosine:
    """``lr_schedule=warmup_cosine``: linear warm-up from ``start_factor`` then cosine decay to ``final_fraction``
    over the run's budget: ``trainer.max_steps`` and ``trainer.max_time``, whichever runs out first (``budget:
    auto``), or only one of them (``steps`` / ``time``). ``warmup`` is a step count or a fraction (< 1) of the budget."""

    def __init__(
        self, warmup: float | int = 0.05, start_factor: float = 0.01, final_fraction: float = 0.1, budget: str = "auto"
    ):
        if budget not in ("auto", "steps", "time"):
            raise ValueError(f"lr_schedule.budget={budget!r} is unknown: auto, steps or time")
        self.warmup, self.start_factor, self.final_fraction, self.budget = warmup, start_factor, final_fraction, budget

    def __call__(self, optimizer, trainer) -> dict:
        """The Lightning scheduler entry (stepped every optimizer step) for ``optimizer`` under ``trainer``'s bounds."""
        import torch

        total, used = trainer_budget(trainer, self.budget)
        if total is None and used is None:
            raise ValueError("the LR schedule needs a budget: set trainer.max_steps or trainer.max_time")
        if total is None and not (isinstance(self.warmup, float) and self.warmup < 1):
            raise ValueError(
                f"lr_schedule.warmup={self.warmup}: a run bounded only by trainer.max_time needs the "
                f"warm-up as a fraction of the budget (e.g. 0.05)"
            )
        warmup = resolve_steps(self.warmup, total) / total if total else self.warmup  # whole steps, as step budgets
        if used is None:  # a step budget only: the closed form of the step (the same LR on every machine)
            steps = resolve_steps(self.warmup, total)
            factor = lambda step: warmup_cosine(step, steps, total, self.start_factor, self.final_fraction)  # noqa: E731
        else:
            factor = lambda step: warmup_cosine_progress(
                budget_progress(step, total, used),
                warmup,  # noqa: E731
                self.start_factor,
                self.final_fraction,
            )
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"scheduler": sched, "interval": "step", "frequency": 1}


class Constant:
    """``lr_schedule=constant``: the optimizer's learning rate throughout (after an optional linear warm-up)."""

    def __init__(self, warmup: int = 0, start_factor: float = 0.01):
        self.warmup, self.start_factor = int(warmup), start_factor

    def __call__(self, optimizer, trainer) -> dict:
        import torch

        w, s = self.warmup, self.start_factor
        factor = lambda step: 1.0 if step >= w else s + (1 - s) * step / max(1, w)  # noqa: E731
        return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step", "frequency": 1}


PERIOD_ALLOWED = (
    "an integer >= 1, the optimizer steps of one decay, or a list of them, one per decay: set lr_schedule.period=N, "
    "or use a method with rounds (method.steps_per_round sets it)"
)


def linear_restarts(step: int, period: int | Sequence[int], final_fraction: float = 0.0) -> float:
    """LR multiplier at ``step``: a linear decay from 1 towards ``final_fraction`` over each ``period`` steps, back to
    1 at every multiple of ``period``; a list of periods decays over each in turn, its last one repeated after."""
    periods = [period] if isinstance(period, int) else list(period)
    ends = list(itertools.accumulate(periods))
    k = bisect.bisect_right(ends, step)
    if k < len(periods):
        start, length = ends[k] - periods[k], periods[k]
    else:  # past the list: its last period repeats
        length = periods[-1]
        start = step - (step - ends[-1]) % length
    return 1.0 - (1.0 - final_fraction) * (step - start) / length


class LinearRestarts:
    """``lr_schedule=linear_restarts``: the rate decays linearly towards ``final_fraction`` over every ``period``
    optimizer steps (a list: over each listed length in turn), then restarts at the full rate: one decay per round of
    a round-based method (progressive distillation's ``method.steps_per_round``, the config's default, when
    ``trainer.max_steps`` is the rounds' total), as Salimans & Ho's released distillation configs anneal the rate of
    each halving round to zero."""

    def __init__(self, period: int | Sequence[int] | None = None, final_fraction: float = 0.0):
        listed = isinstance(period, Sequence) and not isinstance(period, str)
        steps = list(period) if listed else [period]
        if not steps or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in steps):
            shown = "null" if period is None else repr(steps if listed else period)
            raise ConfigError(f"lr_schedule.period={shown} is invalid: {PERIOD_ALLOWED}")
        period = tuple(steps) if listed else period
        if (
            isinstance(final_fraction, bool)
            or not isinstance(final_fraction, (int, float))
            or not 0 <= final_fraction <= 1
        ):
            raise ConfigError(f"lr_schedule.final_fraction={final_fraction!r} is invalid: a number in [0, 1]")
        self.period, self.final_fraction = period, float(final_fraction)

    def __call__(self, optimizer, trainer) -> dict:
        """The Lightning scheduler entry, stepped every optimizer step."""
        import torch

        factor = functools.partial(linear_restarts, period=self.period, final_fraction=self.final_fraction)
        return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step", "frequency": 1}
