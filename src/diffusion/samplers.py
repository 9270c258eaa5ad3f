"""Samplers: each one short function ``sampler(model_fn, x_T, schedule, *, steps, ..., generator) -> x_0``.

``model_fn(x_t, t_index) -> (x0_hat, eps_hat)`` (see ``guidance.guided_model_fn``) already applies the
prediction-type conversion, guidance and x0 clipping, so samplers are independent of those choices. ``x_T`` is
standard Gaussian noise in the model's input space. All samplers evaluate the model only at the schedule's discrete
timesteps (a subset chosen by ``spacing``), so they work on any schedule, including zero terminal SNR.
Configure one with ``_partial_: true`` in ``configs/sampler/``.
"""
from __future__ import annotations

from typing import Callable

import torch

from src.diffusion.schedules import DiscreteSchedule

Tensor = torch.Tensor


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device if generator else x.device).to(x.device)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from rich.progress import track
        return track(iterable, description=desc, transient=True)
    except ImportError:  # pragma: no cover
        return iterable


def _pairs(schedule: DiscreteSchedule, steps: int, spacing: str | None) -> list[tuple[int, float, float]]:
    """[(t, alpha_bar_t, alpha_bar_prev)] along a descending timestep subset; the final 'prev' is alpha_bar = 1."""
    ts = schedule.sampling_timesteps(steps, spacing).tolist()
    ab = schedule.alphas_cumprod
    out = []
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        out.append((t, float(ab[t]), float(ab[prev]) if prev >= 0 else 1.0))
    return out


def ddpm(model_fn: Callable, x: Tensor, schedule: DiscreteSchedule, *, steps: int | None = None,
         spacing: str | None = None, generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Ancestral DDPM (Ho et al.) with the posterior 'fixed small' variance; any subset of timesteps."""
    steps = steps or schedule.num_timesteps
    for t, ab_t, ab_prev in _progress(_pairs(schedule, steps, spacing), progress, f"DDPM {steps}"):
        x0, _ = model_fn(x, t)
        alpha = ab_t / ab_prev
        beta = 1 - alpha
        mean = (ab_prev**0.5 * beta / (1 - ab_t)) * x0 + (alpha**0.5 * (1 - ab_prev) / (1 - ab_t)) * x
        var = max((1 - ab_prev) / (1 - ab_t) * beta, 1e-20)
        x = mean + (var**0.5) * _noise_like(x, generator) if t > 0 else mean
    return x


def ddim(model_fn: Callable, x: Tensor, schedule: DiscreteSchedule, *, steps: int = 50, eta: float = 0.0,
         spacing: str | None = None, generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """DDIM (Song et al.): deterministic at eta=0, DDPM-like at eta=1."""
    for t, ab_t, ab_prev in _progress(_pairs(schedule, steps, spacing), progress, f"DDIM {steps}"):
        x0, eps = model_fn(x, t)
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5
        x = ab_prev**0.5 * x0 + max(1 - ab_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * _noise_like(x, generator)
    return x


def dpmpp_2m(model_fn: Callable, x: Tensor, schedule: DiscreteSchedule, *, steps: int = 20,
             spacing: str | None = "linspace", lower_order_final: bool = True,
             generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al.), data prediction, midpoint second-order update, as diffusers' multistep solver."""
    ts = schedule.sampling_timesteps(steps, spacing).tolist()
    ab = schedule.alphas_cumprod
    alpha = lambda t: float(ab[t]) ** 0.5 if t >= 0 else 1.0  # noqa: E731
    sigma = lambda t: (1 - float(ab[t])) ** 0.5 if t >= 0 else 0.0  # noqa: E731
    lam = lambda t: torch.log(torch.tensor(alpha(t) / sigma(t), dtype=torch.float64)).item() if t >= 0 else float("inf")  # noqa: E731
    prev_x0, h_prev = None, None
    for i in _progress(range(len(ts)), progress, f"DPM++2M {steps}"):
        s, t = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        x0, _ = model_fn(x, s)
        h = lam(t) - lam(s)
        phi = -torch.expm1(torch.tensor(-h, dtype=torch.float64)).item()  # 1 - e^{-h}
        last = t < 0
        use_first = prev_x0 is None or (last and lower_order_final and len(ts) < 15)
        if use_first:
            d = x0
        else:
            r = h_prev / h
            d = x0 + (x0 - prev_x0) / (2 * r)
        x = (sigma(t) / sigma(s)) * x + alpha(t) * phi * d
        prev_x0, h_prev = x0, h
    return x


def _to_sigma_space(schedule: DiscreteSchedule, steps: int, spacing: str | None):
    ts = schedule.sampling_timesteps(steps, spacing).tolist()
    sig = [float(schedule.sigmas[t]) for t in ts] + [0.0]
    return ts, sig


def euler(model_fn: Callable, x: Tensor, schedule: DiscreteSchedule, *, steps: int = 50, spacing: str | None = None,
          generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Euler's method on the probability-flow ODE in sigma space (Karras et al. / k-diffusion)."""
    ts, sig = _to_sigma_space(schedule, steps, spacing)
    z = x * (sig[0] ** 2 + 1) ** 0.5  # x_sigma = x_t / sqrt(alpha_bar)
    for i in _progress(range(len(ts)), progress, f"Euler {steps}"):
        x0, _ = model_fn(z / (sig[i] ** 2 + 1) ** 0.5, ts[i])
        z = z + (sig[i + 1] - sig[i]) * (z - x0) / sig[i]
    return z


def heun(model_fn: Callable, x: Tensor, schedule: DiscreteSchedule, *, steps: int = 20, spacing: str | None = None,
         generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Heun's second-order method (EDM Algorithm 1 without churn); the last step to sigma 0 is an Euler step."""
    ts, sig = _to_sigma_space(schedule, steps, spacing)
    z = x * (sig[0] ** 2 + 1) ** 0.5
    for i in _progress(range(len(ts)), progress, f"Heun {steps}"):
        x0, _ = model_fn(z / (sig[i] ** 2 + 1) ** 0.5, ts[i])
        d = (z - x0) / sig[i]
        z_next = z + (sig[i + 1] - sig[i]) * d
        if sig[i + 1] > 0:
            x0_next, _ = model_fn(z_next / (sig[i + 1] ** 2 + 1) ** 0.5, ts[i + 1])
            d_next = (z_next - x0_next) / sig[i + 1]
            z_next = z + (sig[i + 1] - sig[i]) * (d + d_next) / 2
        z = z_next
    return z


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m, "euler": euler, "heun": heun}


def sampler_name(sampler) -> str:
    """Readable name of a configured sampler (a function or a functools.partial of one), e.g. 'ddim-50'."""
    fn = getattr(sampler, "func", sampler)
    steps = getattr(sampler, "keywords", {}).get("steps")
    return f"{fn.__name__}-{steps}" if steps else fn.__name__
