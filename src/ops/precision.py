"""Resolve the trainer's precision: ``auto`` picks the fastest precision the hardware runs natively.

``auto`` resolves, once at start (and the choice is logged), to
- ``bf16-mixed`` on CUDA GPUs with *native* bf16 (Ampere and newer), ``16-mixed`` on older GPUs;
- on CPUs with native bf16 instructions (AMX-BF16 or AVX512-BF16): ``bf16-mixed`` when the denoiser is large
  enough for its matrix work to outweigh autocast's casts (``CPU_BF16_MIN_PARAMS`` trainable parameters; measured by
  ``bench/bench_precision.py``, numbers in BENCHMARKS.md), else ``32-true``: small, overhead-bound recipes such as
  the digits default ran slower in bf16;
- ``32-true`` on every other CPU (bf16 is emulated there and runs at about 0.4x of fp32).

An explicit bf16 precision on a GPU without native bf16 falls back to fp16. ``torch.cuda.is_bf16_supported()``
counts emulation by default (V100 and T4 would report True and run slow emulated bf16), so native support is asked
for explicitly.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

log = logging.getLogger(__name__)

# Below this many trainable parameters bf16 autocast did not pay on a native-bf16 CPU (see BENCHMARKS.md,
# "Precision on CPU"): the digits recipe (0.74M) ran slower in bf16, the CIFAR-10 / STL10 UNets (13M+) faster.
CPU_BF16_MIN_PARAMS = 5_000_000
GPU_ACCELERATORS = ("gpu", "cuda")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip().lower()
        if key in ("flags", "features"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bf16 matrix instructions (x86 AMX-BF16 / AVX512-BF16, Arm BF16)."""
    flags = cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def gpu_has_native_bf16() -> bool:
    """True when the current CUDA GPU runs bf16 natively (compute capability 8.0+), emulation not counted."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation argument; it then asked for native support only
        return bool(torch.cuda.is_bf16_supported())


def runs_on_gpu(accelerator: str | None) -> bool:
    """Whether a Trainer with this ``accelerator`` will put the model on a CUDA GPU."""
    import torch

    return accelerator in (*GPU_ACCELERATORS, "auto", None) and torch.cuda.is_available()


def auto_precision(accelerator: str | None, trainable_params: int | None = None) -> tuple[str, str]:
    """The precision ``auto`` stands for on this machine, and why (for the log line)."""
    if runs_on_gpu(accelerator):
        if gpu_has_native_bf16():
            return "bf16-mixed", "GPU with native bf16"
        return "16-mixed", "GPU without native bf16"
    if not cpu_has_native_bf16():
        return "32-true", "CPU without native bf16 (bf16 would be emulated)"
    if trainable_params is not None and trainable_params < CPU_BF16_MIN_PARAMS:
        return "32-true", (
            f"CPU with native bf16, but the model has {trainable_params / 1e6:.2f}M trainable "
            f"parameters < {CPU_BF16_MIN_PARAMS / 1e6:.0f}M, where bf16 did not pay"
        )
    return "bf16-mixed", "CPU with native bf16"


def resolve_precision(
    precision: str | int | None, accelerator: str | None, trainable_params: int | None = None
) -> str | int | None:
    """``precision`` as the Trainer should get it: ``auto`` resolved for this machine, explicit bf16 on a GPU without
    native bf16 replaced by fp16; the choice is logged."""
    p = str(precision) if precision is not None else None
    if p == "auto":
        chosen, why = auto_precision(accelerator, trainable_params)
        log.info("precision=auto -> %s (%s)", chosen, why)
        return chosen
    if p is None or not p.startswith("bf16"):
        return precision
    if runs_on_gpu(accelerator) and not gpu_has_native_bf16():
        fallback = "16-mixed" if p.endswith("mixed") else "16-true"
        log.warning("precision=%s: this GPU has no native bf16, using %s", p, fallback)
        return fallback
    if accelerator == "cpu" and not cpu_has_native_bf16():
        log.warning(
            "precision=%s on a CPU without native bf16: autocast emulates bf16 and runs slower than fp32 "
            "(trainer.precision=auto picks 32-true here)",
            p,
        )
    return precision
