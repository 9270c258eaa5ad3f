"""Classifier-free guidance whose strength rises as sampling goes from noise to data (the linear weight schedule of
Wang et al. 2024, arXiv 2404.13040): weak guidance while the layout forms, strong while details do."""

from __future__ import annotations

from typing import Any

import torch

from difflab.diffusion.guidance import Guidance, GuidanceStep, cfg_combine, rescale_guidance


def ramp_cfg(
    step: GuidanceStep, scale: float | torch.Tensor, rescale: float = 0.0, **_: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """u + w (c - u) with w - 1 = 2 (scale - 1)(1 - r), r = sigma / (alpha + sigma) the flow-equivalent time (1 at
    pure noise, 0 at the data): no guidance at pure noise, twice CFG's strength at the data, CFG's on average over r
    (the paper's schedule is linear in the step index: the same on an evenly spaced flow grid); then CFG's rescale."""
    r = step.sigma / (step.alpha + step.sigma)
    s = torch.as_tensor(scale, dtype=r.dtype, device=r.device)
    s = s.reshape(-1, *([1] * (step.x_t.ndim - 1))) if s.ndim > 0 else s  # per-class scales: one per sample
    w = (1 + 2 * (s - 1) * (1 - r)).to(step.out_c.dtype)
    return step.to_x0_eps(rescale_guidance(cfg_combine(step.out_c, step.out_r, w), step.out_c, rescale))


class RampCFG(Guidance):
    """``guidance=ramp_cfg``: CFG's settings, its combination replaced by ``ramp_cfg``."""

    name = "ramp_cfg"
    combine = staticmethod(ramp_cfg)
