"""Fit the trainer config to the machine it runs on: a GPU recipe on a CPU-only machine runs on the CPU, with a
warning that says how to ask for that explicitly, instead of Lightning's "No supported gpu backend found!"."""

from __future__ import annotations

import logging
from typing import Any

from difflab.ops.precision import GPU_ACCELERATORS

log = logging.getLogger(__name__)


def fit_accelerator(tcfg: dict[str, Any]) -> dict[str, Any]:
    """``tcfg`` (a plain trainer config dict) with a GPU request replaced by one CPU process when no GPU is visible."""
    import torch

    if str(tcfg.get("accelerator")) not in GPU_ACCELERATORS or torch.cuda.is_available():
        return tcfg
    was = f"accelerator={tcfg.get('accelerator')} devices={tcfg.get('devices')} strategy={tcfg.get('strategy')}"
    tcfg = {**tcfg, "accelerator": "cpu", "devices": 1}
    if str(tcfg.get("strategy", "auto")).startswith("ddp"):
        tcfg["strategy"] = "auto"
        tcfg.pop("sync_batchnorm", None)
    log.warning(
        "the trainer config asks for a GPU (%s) but no GPU is visible: training on one CPU process instead "
        "(add trainer=cpu to ask for this, or trainer=ddp_cpu for 2 CPU processes)",
        was,
    )
    return tcfg
