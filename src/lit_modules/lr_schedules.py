"""Learning-rate schedules stepped per optimizer step."""
from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, start_factor: float = 0.01,
                  final_fraction: float = 0.1) -> float:
    """LR multiplier: linear warm-up from ``start_factor`` to 1, then cosine decay to ``final_fraction``."""
    if warmup_steps > 0 and step < warmup_steps:
        return start_factor + (1 - start_factor) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_steps(value: float | int, total_steps: int) -> int:
    """A step count given either as an int or as a fraction (< 1) of the total."""
    return int(round(value * total_steps)) if isinstance(value, float) and value < 1 else int(value)
