"""Classifier-free guidance and the guided model function every sampler consumes.

Convention (diffusers' ``guidance_scale``): ``out = uncond + scale * (cond - uncond)``; ``scale = 1 + w`` in Ho &
Salimans' notation, so ``scale = 1`` is plain conditional sampling and ``scale = 0`` is unconditional.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from src.diffusion.objectives import clip_x0, predictions_from_output

Tensor = torch.Tensor
ModelFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _per_sample(value, like: Tensor) -> Tensor | float:
    if isinstance(value, Tensor) and value.ndim > 0:
        return value.to(like).reshape(-1, *([1] * (like.ndim - 1)))
    return float(value)


def cfg_combine(cond: Tensor, uncond: Tensor, scale) -> Tensor:
    """uncond + scale (cond - uncond); ``scale`` may be a float or a per-sample tensor (per-class scales)."""
    return uncond + _per_sample(scale, cond) * (cond - uncond)


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Lin et al.'s guidance rescale: match the per-sample std of the conditional output, mixed by ``phi``."""
    if phi <= 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp(min=1e-12))
    return phi * rescaled + (1 - phi) * guided


def guidance_active(sigma: float, interval: Sequence[float] | None) -> bool:
    """Guidance interval (Kynkaanniemi et al.): guide only when sigma_lo < sigma <= sigma_hi; None = always."""
    if interval is None:
        return True
    lo, hi = interval
    return lo < sigma <= hi


def concat_cond(a: dict, b: dict) -> dict:
    """Concatenate two conditioning dicts along the batch (None entries stay None)."""
    return {k: (None if a[k] is None else torch.cat([a[k], b[k]])) for k in a}


def guided_model_fn(net: Callable[[Tensor, Tensor, dict], Tensor], schedule, prediction: str, cond: dict,
                    null_cond: dict | None = None, scale=1.0, rescale: float = 0.0,
                    interval: Sequence[float] | None = None, x0_clip: str | None = None) -> ModelFn:
    """Wrap ``net(x_t, t, cond) -> output`` into ``model_fn(x_t, t_index) -> (x0_hat, eps_hat)`` with CFG.

    Conditional and unconditional passes run as one batched forward. ``t_index`` is a scalar integer timestep.
    """
    no_guidance = null_cond is None or (not isinstance(scale, Tensor) and float(scale) == 1.0)

    def model_fn(x_t: Tensor, t_index: Tensor) -> tuple[Tensor, Tensor]:
        t_index = torch.as_tensor(t_index, device=x_t.device).long()
        t = t_index.expand(x_t.shape[0]).to(x_t.device)
        sigma = float(schedule.sigmas[int(t_index)])
        if no_guidance or not guidance_active(sigma, interval):
            out = net(x_t, t.float(), cond)
        else:
            both = net(torch.cat([x_t, x_t]), torch.cat([t, t]).float(), concat_cond(cond, null_cond))
            out_c, out_u = both.chunk(2)
            out = rescale_guidance(cfg_combine(out_c, out_u, scale), out_c, rescale)
        ab = schedule.alpha_bar(t, like=x_t).to(torch.float64)
        x0, eps = predictions_from_output(out.to(torch.float64), x_t.to(torch.float64), ab, prediction)
        if x0_clip not in (None, "none"):
            x0 = clip_x0(x0, x0_clip)
        return x0.to(x_t.dtype), eps.to(x_t.dtype)

    return model_fn
