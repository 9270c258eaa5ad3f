"""Samplers: each one short function ``sampler(model_fn, x_T, schedule, *, steps, ..., generator) -> x_0``.

``model_fn(x_t, t_index) -> (x0_hat, eps_hat)`` (see ``guidance.guided_model_fn``) already applies the
prediction-type conversion, guidance and x0 clipping, and returns a consistent pair
(``x_t = sqrt(ab) x0_hat + sqrt(1 - ab) eps_hat``), so samplers are independent of those choices. ``x_T`` is standard
Gaussian noise in the model's input space. Samplers evaluate the model only at the schedule's integer timesteps
(a subset chosen by ``spacing``; None = the schedule's), so they run on any schedule.

All state is kept in the variance-preserving space of x_t. Euler and Heun integrate the probability-flow ODE in
sigma = sqrt((1 - ab) / ab) (k-diffusion / EDM, whose state is z = x_t / sqrt(ab)), rewritten in x_t so that zero
terminal SNR (ab = 0, sigma = inf, lambda = log(alpha / sigma) = -inf at t = T - 1) is handled as an exact limit:
a step that starts at sigma = inf becomes x_next = sqrt(ab') x0_hat + sqrt(1 - ab') eps_hat (no inf arithmetic).
Configure one with ``_partial_: true`` in ``configs/sampler/``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from difflab.diffusion.schedules import DiscreteSchedule

Tensor = torch.Tensor


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (so seeded runs replay exactly)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from rich.progress import track
        return track(iterable, description=desc, transient=True)
    except ImportError:  # pragma: no cover
        return iterable


def _grid(schedule: DiscreteSchedule, steps: int, spacing: str | None,
          exclude_zero: bool = False) -> list[tuple[int, float, float]]:
    """[(t, alpha_bar_t, alpha_bar_next)] along a descending timestep subset; the final 'next' is alpha_bar = 1."""
    ts = schedule.sampling_timesteps(steps, spacing, exclude_zero=exclude_zero).tolist()
    ab = schedule.alphas_cumprod.tolist()
    return [(t, ab[t], ab[ts[i + 1]] if i + 1 < len(ts) else 1.0) for i, t in enumerate(ts)]


def _ddim_step(x0: Tensor, eps: Tensor, ab_next: float, sigma: float = 0.0) -> Tensor:
    """x_next = sqrt(ab') x0 + sqrt(1 - ab' - sigma^2) eps (the DDIM update; sigma = 0: deterministic)."""
    return ab_next**0.5 * x0 + max(1.0 - ab_next - sigma**2, 0.0) ** 0.5 * eps


def ddpm(model_fn: Callable, x: Tensor, schedule: DiscreteSchedule, *, steps: int | None = None,
         spacing: str | None = None, variance: str = "small", generator: torch.Generator | None = None,
         progress: bool = False) -> Tensor:
    """Ancestral DDPM (Ho et al.) on any subset of timesteps; ``steps=None`` uses all T.

    x_prev ~ N(posterior mean(x0_hat, x_t), var) with var the posterior 'fixed small' variance
    (1 - ab') / (1 - ab) beta or 'large' (beta = 1 - ab / ab'). Noise is drawn at every step with t > 0, one
    tensor per step, like diffusers' DDPMScheduler, so a replayed generator gives the same chain.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"sampler.variance must be 'small' or 'large', got {variance!r}")
    steps = steps or schedule.num_timesteps
    for t, ab_t, ab_prev in _progress(_grid(schedule, steps, spacing), progress, f"DDPM {steps}"):
        x0, _ = model_fn(x, t)
        alpha = ab_t / ab_prev
        beta = 1 - alpha
        mean = (ab_prev**0.5 * beta / (1 - ab_t)) * x0 + (alpha**0.5 * (1 - ab_prev) / (1 - ab_t)) * x
        var = max((1 - ab_prev) / (1 - ab_t) * beta, 1e-20) if variance == "small" else beta
        x = mean + var**0.5 * _noise_like(x, generator) if t > 0 else mean
    return x


def ddim(model_fn: Callable, x: Tensor, schedule: DiscreteSchedule, *, steps: int = 50, eta: float = 0.0,
         spacing: str | None = None, generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """DDIM (Song et al.): deterministic at eta=0, DDPM-like at eta=1. Steps to the next timestep of the subset."""
    for t, ab_t, ab_prev in _progress(_grid(schedule, steps, spacing), progress, f"DDIM {steps}"):
        x0, eps = model_fn(x, t)
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5
        x = _ddim_step(x0, eps, ab_prev, sigma)
        if sigma > 0:
            x = x + sigma * _noise_like(x, generator)
    return x


def _log_alpha_sigma_ratio(ab: float) -> float:
    """lambda = log(alpha / sigma) = 0.5 log(ab / (1 - ab)), with the limits -inf at ab = 0 and inf at ab = 1."""
    if ab <= 0.0:
        return -math.inf
    if ab >= 1.0:
        return math.inf
    return 0.5 * (math.log(ab) - math.log1p(-ab))


def dpmpp_2m(model_fn: Callable, x: Tensor, schedule: DiscreteSchedule, *, steps: int = 20,
             spacing: str | None = None, generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): multistep, data prediction, midpoint form, as diffusers' multistep solver.

    Timestep grid of multistep solvers (``exclude_zero``): the last step goes from the smallest timestep to sigma 0
    (first order, i.e. it returns x0_hat), the first step is first order, all others second order:
    x' = (s'/s) x + alpha' (1 - e^{-h}) D, D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h, h = lambda' - lambda.
    A step from lambda = -inf (zero terminal SNR) is the exact limit x' = s' x + alpha' x0 (and the next step,
    with r = inf, is first order too).
    """
    grid = _grid(schedule, steps, spacing, exclude_zero=True)
    prev_x0, h_prev = None, None
    for i in _progress(range(len(grid)), progress, f"DPM++2M {steps}"):
        t, ab_s, ab_t = grid[i]
        x0, _ = model_fn(x, t)
        a_s, s_s = ab_s**0.5, (1 - ab_s) ** 0.5
        a_t, s_t = ab_t**0.5, (1 - ab_t) ** 0.5
        lam_s, lam_t = _log_alpha_sigma_ratio(ab_s), _log_alpha_sigma_ratio(ab_t)
        h = lam_t - lam_s
        last = i == len(grid) - 1
        if prev_x0 is None or last or not math.isfinite(h_prev) or not math.isfinite(h):
            d = x0
        else:
            d = x0 + (x0 - prev_x0) * (h / (2 * h_prev))  # (x0 - x0_prev) / (2 r)
        # alpha' (1 - e^{-h}) = alpha' - alpha s' / s: exact at h = inf (s' = 0 or alpha = 0)
        coef = -a_t * math.expm1(-h) if math.isfinite(h) else a_t - a_s * s_t / s_s
        x = (s_t / s_s) * x + coef * d
        prev_x0, h_prev = x0, h
    return x


def _sigma(ab: float) -> float:
    return math.inf if ab <= 0 else math.sqrt((1 - ab) / ab)


def euler(model_fn: Callable, x: Tensor, schedule: DiscreteSchedule, *, steps: int = 50, spacing: str | None = None,
          generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Euler's method on the probability-flow ODE in sigma space (Karras et al. / k-diffusion ``sample_euler``).

    z' = z + (sigma' - sigma) d with d = (z - x0_hat) / sigma, z = x / sqrt(ab); in x_t terms
    x' = sqrt(ab') x0_hat + sqrt(1 - ab') d, which is DDIM (eta = 0) with eps taken from x0_hat.
    """
    for t, ab_t, ab_next in _progress(_grid(schedule, steps, spacing), progress, f"Euler {steps}"):
        x0, _ = model_fn(x, t)
        d = (x - ab_t**0.5 * x0) / (1 - ab_t) ** 0.5  # = (z - x0) / sigma, finite at sigma = inf
        x = _ddim_step(x0, d, ab_next)
    return x


def heun(model_fn: Callable, x: Tensor, schedule: DiscreteSchedule, *, steps: int = 20, spacing: str | None = None,
         euler_above: float | None = 80.0, generator: torch.Generator | None = None,
         progress: bool = False) -> Tensor:
    """Heun's second-order method (EDM Algorithm 1, no churn) over the schedule's sigmas.

    Predictor: an Euler step; corrector: average the slopes at both ends, z' = z + (sigma' - sigma)(d + d') / 2.
    Euler steps instead: the last step (to sigma 0, as in EDM), a step from sigma = inf (zero terminal SNR: the
    trapezoid rule has no finite form there), and a step from sigma > ``euler_above`` (default 80, EDM's sigma_max:
    the trapezoid's error grows with the interval length, and e.g. the cosine schedule's last step has sigma ~ 2e4;
    None = never). NFE: see ``model_evaluations``.
    """
    grid = _grid(schedule, steps, spacing)
    for i in _progress(range(len(grid)), progress, f"Heun {steps}"):
        t, ab_t, ab_next = grid[i]
        x0, _ = model_fn(x, t)
        d = (x - ab_t**0.5 * x0) / (1 - ab_t) ** 0.5
        x_euler = _ddim_step(x0, d, ab_next)
        if not _heun_corrects(ab_t, ab_next, euler_above):
            x = x_euler
            continue
        x0_next, _ = model_fn(x_euler, grid[i + 1][0])
        d_next = (x_euler - ab_next**0.5 * x0_next) / (1 - ab_next) ** 0.5
        # corrector in z = x / sqrt(ab), mapped back: x' = x_euler + sqrt(ab') (sigma' - sigma) (d' - d) / 2
        x = x_euler + ab_next**0.5 * (_sigma(ab_next) - _sigma(ab_t)) * (d_next - d) / 2
    return x


def _heun_corrects(ab_t: float, ab_next: float, euler_above: float | None) -> bool:
    """Whether Heun takes a second-order step from ab_t to ab_next (else a plain Euler step)."""
    if ab_next >= 1.0 or ab_t <= 0.0:
        return False
    return euler_above is None or _sigma(ab_t) <= euler_above


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m, "euler": euler, "heun": heun}


def model_evaluations(sampler_fn: Callable, schedule: DiscreteSchedule, steps: int | None = None,
                      spacing: str | None = None) -> int:
    """Number of model_fn calls (NFE) a sampler makes for ``steps`` on ``schedule`` (with CFG each is one
    batched forward of the conditional and unconditional inputs)."""
    name = getattr(getattr(sampler_fn, "func", sampler_fn), "__name__", "")
    keywords = getattr(sampler_fn, "keywords", {})
    steps = steps or keywords.get("steps") or schedule.num_timesteps
    spacing = spacing or keywords.get("spacing")
    if name == "heun":
        euler_above = keywords.get("euler_above", 80.0)
        grid = _grid(schedule, steps, spacing)
        return len(grid) + sum(_heun_corrects(ab_t, ab_n, euler_above) for _, ab_t, ab_n in grid)
    return steps


def sampler_name(sampler) -> str:
    """Readable name of a configured sampler (a function or a functools.partial of one), e.g. 'ddim-50'."""
    fn = getattr(sampler, "func", sampler)
    steps = getattr(sampler, "keywords", {}).get("steps")
    return f"{fn.__name__}-{steps}" if steps else fn.__name__


def timesteps_used(sampler, schedule: DiscreteSchedule, steps: int, spacing: str | None = None) -> Sequence[int]:
    """The descending training timesteps a sampler evaluates the model at (its grid; Heun also re-uses them)."""
    name = getattr(getattr(sampler, "func", sampler), "__name__", "")
    return schedule.sampling_timesteps(steps, spacing, exclude_zero=name == "dpmpp_2m").tolist()
