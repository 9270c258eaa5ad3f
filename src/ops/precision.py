"""Pick a trainer precision the hardware supports (bf16-mixed on GPUs that have bf16, else 16-mixed)."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def supported_precision(precision: str | int | None, accelerator: str | None) -> str | int | None:
    """``precision`` unless it asks for bf16 on a CUDA GPU without bf16 (pre-Ampere): then ``16-mixed``.

    On CPU, bf16 autocast is only fast with native bf16 (AMX / avx512_bf16); the CPU trainer configs use 32-true.
    """
    p = str(precision) if precision is not None else None
    if p is None or not p.startswith("bf16"):
        return precision
    wants_gpu = accelerator in ("gpu", "cuda", "auto", None)
    if wants_gpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        fallback = "16-mixed" if p.endswith("mixed") else "16-true"
        log.warning("precision=%s: this GPU has no bf16 support, using %s", p, fallback)
        return fallback
    if accelerator == "cpu":
        log.warning("precision=%s on CPU: bf16 autocast is slower than fp32 on CPUs without native bf16", p)
    return precision
