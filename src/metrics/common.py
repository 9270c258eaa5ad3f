"""Small helpers shared by the metric modules: one-time warnings and pixel conversion."""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

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


def to_uint8(x: Tensor) -> Tensor:
    """Map pixels in [-1, 1] (the batch convention) to uint8 [0, 255]; uint8 input is returned unchanged.

    floor((x + 1) * 127.5 + 0.5) is StyleGAN's ``(x * 127.5 + 128).clamp(0, 255).to(uint8)`` quantisation; real and
    fake data go through the same rounding before Inception / I3D, and ``k / 127.5 - 1`` maps back to ``k``.
    """
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise TypeError(f"expected float pixels in [-1, 1] or uint8, got dtype {x.dtype}")
    return ((x.clamp(-1, 1) + 1) * 127.5 + 0.5).floor().clamp(0, 255).to(torch.uint8)
