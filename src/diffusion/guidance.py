"""Classifier-free guidance and the guided model function every sampler consumes.

Convention (diffusers' ``guidance_scale``): ``out = uncond + scale * (cond - uncond)``; ``scale = 1 + w`` in Ho &
Salimans' notation ``(1 + w) cond - w uncond``, so ``scale = 1`` is plain conditional sampling (one forward pass) and
``scale = 0`` is unconditional. Guidance acts on the network's raw output (eps, x0 or v: the combination is linear,
so for a fixed x_t it is the same in every parameterisation); rescale (Lin et al.) matches the per-sample std of
the guided output to the conditional one; the interval (Kynkaanniemi et al.) limits guidance to a noise range.

The guidance interval's unit, for every process: sigma_ve = sigma / alpha, the variance-exploding (EDM) noise level
(sqrt((1 - alpha_bar) / alpha_bar) on vp, sigma itself on edm, t / (1 - t) on flow).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from difflab.diffusion.objectives import clip_x0, eps_from_x0, input_scale, predictions_from_output

Tensor = torch.Tensor
ModelFn = Callable[[Tensor, float], tuple[Tensor, Tensor]]


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


def check_interval(interval: Sequence[float | None] | None) -> tuple[float, float] | None:
    """Validate a guidance interval [sigma_lo, sigma_hi] (None entries: 0 / inf); None means always guide."""
    if interval is None:
        return None
    if len(interval) != 2:
        raise ValueError(f"guidance.interval must be [sigma_lo, sigma_hi] or null, got {list(interval)}")
    lo = 0.0 if interval[0] is None else float(interval[0])
    hi = math.inf if interval[1] is None else float(interval[1])
    if not 0 <= lo < hi:
        raise ValueError(f"guidance.interval needs 0 <= sigma_lo < sigma_hi, got [{lo}, {hi}]")
    return lo, hi


def guidance_active(sigma: float, interval: Sequence[float | None] | None) -> bool:
    """Guidance interval (Kynkaanniemi et al.): guide only when sigma_lo < sigma <= sigma_hi; None = always.

    sigma is the variance-exploding noise level sigma_ve = sigma / alpha of the current time (module docstring).
    """
    bounds = check_interval(interval)
    if bounds is None:
        return True
    lo, hi = bounds
    return lo < sigma <= hi


def concat_cond(a: dict, b: dict) -> dict:
    """Concatenate two conditioning dicts along the batch (None entries stay None)."""
    return {k: (None if a[k] is None else torch.cat([a[k], b[k]])) for k in a}


def guided_model_fn(net: Callable[[Tensor, Tensor, dict], Tensor], process, prediction: str, cond: dict,
                    null_cond: dict | None = None, scale=1.0, rescale: float = 0.0,
                    interval: Sequence[float | None] | None = None,
                    x0_clip: str | Callable[[Tensor], Tensor] | None = None, sigma_data: float = 0.5) -> ModelFn:
    """Wrap ``net(x_in, net_time, cond) -> output`` into ``model_fn(x_t, t) -> (x0_hat, eps_hat)`` with CFG.

    ``t`` is a scalar process time (``process.sampling_times`` entries); the process gives the path coefficients
    and the denoiser's time input, the prediction type converts the output. Conditional and unconditional passes
    run as one batched forward. ``x0_clip`` is a mode name (none / static / dynamic) or a callable
    (``Objective.x0_clip``); after clipping, eps is recomputed from the clipped x0 so the pair stays consistent with
    x_t (as GLIDE does), which every sampler relies on. Conversions run in float64; outputs have x_t's dtype.
    """
    no_guidance = null_cond is None or (not isinstance(scale, Tensor) and float(scale) == 1.0)
    bounds = check_interval(interval)  # fail on a bad interval before sampling starts
    if callable(x0_clip):
        clip = x0_clip
    elif x0_clip in (None, "none"):
        clip = None
    else:
        clip = lambda x0: clip_x0(x0, x0_clip)  # noqa: E731

    def model_fn(x_t: Tensor, t) -> tuple[Tensor, Tensor]:
        t64 = torch.full((x_t.shape[0],), float(t), dtype=torch.float64, device=x_t.device)
        alpha, sigma = process.coefficients(t64[:1])
        sigma_ve = float(sigma / alpha) if float(alpha) > 0 else math.inf
        x_in = x_t * float(input_scale(alpha, sigma, prediction, sigma_data))
        t_net = process.net_time(t64).to(x_t.device)
        if no_guidance or not guidance_active(sigma_ve, bounds):
            out = net(x_in, t_net, cond)
        else:
            both = net(torch.cat([x_in, x_in]), torch.cat([t_net, t_net]), concat_cond(cond, null_cond))
            out_c, out_u = both.chunk(2)
            out = rescale_guidance(cfg_combine(out_c, out_u, scale), out_c, rescale)
        x64 = x_t.to(torch.float64)
        a, s = (v.to(x64.device).reshape(1, *([1] * (x64.ndim - 1))) for v in (alpha, sigma))
        derivs = process.derivatives(t64[:1]) if prediction == "flow" else (None, None)
        da, ds = (None if v is None else v.to(x64.device).reshape(a.shape) for v in derivs)
        x0, eps = predictions_from_output(out.to(torch.float64), x64, a, s, prediction, da, ds, sigma_data)
        if clip is not None:
            x0 = clip(x0)
            eps = eps_from_x0(x64, x0, a, s)
        return x0.to(x_t.dtype), eps.to(x_t.dtype)

    return model_fn
