"""Round lengths of a round-based distillation (progressive): how many rounds, each one's optimizer steps, the step
count that ends every round and their total. Plain Python (no torch): the config package's resolver and checks read it."""

from __future__ import annotations

import bisect
import itertools
import math
from typing import Any, Sequence, TypeGuard

from difflab.utils.errors import ConfigError


def round_count(teacher_steps: int, student_steps: int) -> int:
    """How many halving rounds take ``teacher_steps`` DDIM steps down to ``student_steps`` (log2 of their ratio,
    rounded down)."""
    return max(0, (int(teacher_steps) // max(1, int(student_steps))).bit_length() - 1)


def is_listed(steps_per_round: Any) -> TypeGuard[Sequence[Any]]:
    """``method.steps_per_round`` gives one length per round (a list) rather than one for all."""
    return isinstance(steps_per_round, Sequence) and not isinstance(steps_per_round, str)


def _is_length(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def round_lengths(steps_per_round: int | Sequence[int], rounds: int) -> tuple[int, ...]:
    """Each of ``rounds`` rounds' optimizer steps from ``method.steps_per_round`` (one length for all, or one per
    round); ConfigError otherwise."""
    lengths: list[Any] = list(steps_per_round) if is_listed(steps_per_round) else [steps_per_round] * rounds
    if not all(_is_length(n) for n in lengths) or len(lengths) != rounds:
        shown = lengths if is_listed(steps_per_round) else steps_per_round
        raise ConfigError(
            f"method.steps_per_round={shown} is invalid: an integer >= 1 (every round's optimizer steps) or a "
            f"list of {rounds}, one per round ({rounds} rounds halve the teacher's DDIM steps to the student's)"
        )
    return tuple(lengths)


def round_gcd(steps_per_round: Any) -> Any:
    """The step count that ends every round: the one length, or the listed lengths' greatest common divisor (the
    cadence a run's checkpoints, validation and class grid take to keep each round's student). Anything else comes
    back unchanged, for ``round_lengths`` to name."""
    lengths: list[Any] = list(steps_per_round) if is_listed(steps_per_round) else []
    return math.gcd(*lengths) if lengths and all(_is_length(n) for n in lengths) else steps_per_round


def round_total(steps_per_round: Any, teacher_steps: Any, student_steps: Any) -> Any:
    """Every round's optimizer steps together: the ``trainer.max_steps`` that runs the last round in full and stops
    there (listed lengths: their sum; one length: times the rounds the step counts make). Anything that is not lengths,
    or one length with step counts that make no round, comes back unchanged: the method's own check names it, and the
    budget adds no second line."""
    if is_listed(steps_per_round):
        lengths = list(steps_per_round)
        return sum(lengths) if lengths and all(_is_length(n) for n in lengths) else steps_per_round
    counts = all(_is_length(n) for n in (teacher_steps, student_steps))
    rounds = round_count(teacher_steps, student_steps) if counts else 0
    return steps_per_round * rounds if _is_length(steps_per_round) and rounds >= 1 else steps_per_round


def budget_mismatch(lengths: Sequence[int], max_steps: int | None) -> str | None:
    """What a step budget other than the rounds' total does to them, in words (None when it runs them exactly, or
    sets no step bound): a shorter one stops inside a round, a longer one keeps training the last round's student."""
    total = sum(lengths)
    if max_steps is None or max_steps < 1 or max_steps == total:
        return None
    if max_steps > total:
        extra = max_steps - total
        return f"the last round's student trains {extra} {'step' if extra == 1 else 'steps'} past the rounds' {total}"
    ends = list(itertools.accumulate(lengths))
    r = bisect.bisect_left(ends, max_steps)  # the round whose steps include step max_steps
    start, n = ends[r] - lengths[r], lengths[r]
    stops = (
        f"training stops as round {r + 1} ends"
        if max_steps == start + n
        else f"training stops in round {r + 1} after {max_steps - start} of its {n} steps"
    )
    later = len(lengths) - r - 1
    never = f"round {r + 2} never starts" if later == 1 else f"rounds {r + 2}-{len(lengths)} never start"
    return stops + (f"; {never}" if later else "")
