"""Small helpers shared by the metric modules: one-time warnings and pixel conversion (``to_uint8``, re-exported from
``difflab.utils.images`` so that metric inputs are quantised exactly like saved images)."""

from __future__ import annotations

import os
import warnings

import torch

from difflab.utils.images import to_uint8  # noqa: F401 - re-exported: the metrics' pixel quantiser is the project's one

_WARNED: set[str] = set()


def is_rank_zero() -> bool:
    """True on the global rank-0 process (or when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a UserWarning once per process and ``key``, and only on rank 0.

    Metrics that cannot run (missing weights) are skipped at every evaluation; this keeps the log to one line.
    """
    if key in _WARNED:
        return
    _WARNED.add(key)
    if is_rank_zero():
        warnings.warn(message, UserWarning, stacklevel=3)
