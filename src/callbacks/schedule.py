"""When diagnostics run: densely early (1, 2, 4, 8, ...) then every N steps, and at the end."""

from __future__ import annotations


def is_scheduled(step: int, every_n_steps: int, dense_early: bool = True) -> bool:
    """True at powers of two below ``every_n_steps`` (if dense_early) and at multiples of ``every_n_steps``."""
    if step <= 0:
        return False
    if every_n_steps > 0 and step % every_n_steps == 0:
        return True
    return dense_early and step < every_n_steps and (step & (step - 1)) == 0
