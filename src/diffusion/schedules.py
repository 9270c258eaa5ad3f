"""The beta tables of the ``vp`` process (``difflab.diffusion.processes.VPProcess``): beta / alpha-bar profiles,
zero-terminal-SNR rescaling, timestep spacing and the discrete training-timestep density.

Conventions: ``alphas_cumprod[t]`` (alpha-bar) is the signal fraction at training step ``t`` in ``[0, T)``;
``x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps``. SNR = alpha_bar / (1 - alpha_bar), log-SNR its log, and
sigma (EDM / k-diffusion, variance-exploding units) = sqrt(1 / SNR). Everything is float64 on the CPU; callers
gather and cast. With zero terminal SNR the last alpha-bar is exactly 0 (SNR 0, log-SNR -inf, sigma inf): samplers
handle that limit explicitly instead of clamping it away.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
from torch.types import Device

from difflab.diffusion.draws import rng_device, standard_normal

Tensor = torch.Tensor
SPACINGS = ("leading", "trailing", "linspace")
VP_DENSITIES = ("uniform", "logit_normal")


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear betas (Ho et al.), taken as given for any T (the diffusers convention)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's 'scaled_linear': linear in sqrt(beta)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def betas_from_alpha_bar(alpha_bar: Callable[[Tensor], Tensor], num_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """Discretise a continuous alpha-bar(t in [0,1]) into betas 1 - ab(t+1/T)/ab(t), capped at ``max_beta``."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    ab = alpha_bar(t)
    return (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def cosine_alpha_bar(t: Tensor, offset: float = 0.008, logsnr_shift: float = 0.0) -> Tensor:
    """Improved-DDPM alpha-bar cos^2(((t + s) / (1 + s)) pi/2) / cos^2(s/(1+s) pi/2) for t in [0, 1].

    ``offset`` is s (Nichol & Dhariwal: keeps beta small near t = 0). ``logsnr_shift`` adds a constant to log-SNR
    (the 'shifted cosine' of Hoogeboom et al., e.g. 2 log(64 / resolution)); 0 leaves the schedule unchanged.
    """
    f = torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
    ab = (f / math.cos(offset / (1 + offset) * math.pi / 2) ** 2).clamp(0, 1)
    if logsnr_shift:
        ab = torch.sigmoid(torch.logit(ab) + logsnr_shift)  # logit(1) = inf and logit(0) = -inf stay fixed
    return ab


def cosine_betas(
    num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999, logsnr_shift: float = 0.0
) -> Tensor:
    """Improved-DDPM cosine schedule (diffusers' squaredcos_cap_v2 at the defaults), with a configurable offset s."""
    if offset < 0:
        raise ValueError(f"schedule.offset must be >= 0 (the cosine schedule's s, usually 0.008); got {offset}")
    return betas_from_alpha_bar(lambda t: cosine_alpha_bar(t, offset, logsnr_shift), num_timesteps, max_beta)


def sigmoid_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, width: float = 6.0) -> Tensor:
    """Sigmoid-shaped betas between beta_start and beta_end over [-width, width] (GeoDiff / diffusers 'sigmoid')."""
    x = torch.linspace(-width, width, num_timesteps, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


BETA_SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has SNR exactly 0 and the first is unchanged (Lin et al.)."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def spaced_timesteps(
    num_timesteps: int, steps: int, spacing: str = "leading", offset: int = 0, exclude_zero: bool = False
) -> Tensor:
    """Descending subset of ``steps`` training timesteps, spaced as in diffusers ('leading', 'trailing', 'linspace').

    ``exclude_zero`` is the multistep-solver (DPM-Solver) convention: leading / linspace place ``steps + 1`` points
    and drop the one at t = 0, because the solver's last step goes from the smallest kept timestep to sigma = 0.
    Trailing spacing is the same either way. ``offset`` is diffusers' ``steps_offset`` (leading only).
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing '{spacing}': choose one of {SPACINGS}")
    extra = 1 if exclude_zero and spacing != "trailing" else 0
    if not 1 <= steps + extra <= num_timesteps:
        raise ValueError(
            f"sampler steps must be in [1, {num_timesteps - extra}] for a schedule with num_timesteps="
            f"{num_timesteps} and spacing '{spacing}'; got {steps}"
        )
    n = steps + extra
    if spacing == "leading":
        ts = torch.arange(n, dtype=torch.float64) * (num_timesteps // n) + offset
    elif spacing == "trailing":
        # round(T - i T / steps) - 1 for the integers i < steps. The values are computed as numpy's arange does
        # (start + i * delta, delta = (start + step) - start) so they equal diffusers' at ties; its float
        # arange(T, 0, -T / steps) itself can yield steps + 1 points (the last one -1), so the count is fixed here.
        delta = (num_timesteps - num_timesteps / steps) - num_timesteps
        ts = (num_timesteps + torch.arange(steps, dtype=torch.float64) * delta).round().flip(0) - 1
    else:
        ts = torch.linspace(0, num_timesteps - 1, n, dtype=torch.float64).round()
    ts = ts.long()[extra:]
    if ts.max() >= num_timesteps or ts.min() < 0:
        raise ValueError(f"timestep offset {offset} pushes the '{spacing}' grid outside [0, {num_timesteps})")
    return ts.flip(0)


def check_kind_kwargs(kind: str, kwargs: dict[str, Any]) -> None:
    """Refuse settings the beta profile ``kind`` does not take (a key left over from another schedule=)."""
    allowed = [p for p in inspect.signature(BETA_SCHEDULES[kind]).parameters if p != "num_timesteps"]
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise ValueError(
            f"schedule kind '{kind}' does not take {bad}; its settings are {allowed} "
            f"(remove the key or pick another schedule=)"
        )


def sample_timesteps(
    n: int,
    num_timesteps: int,
    kind: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    device: Device = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training timesteps: uniform over [0, T) or logit-normal (SD3: t/T = sigmoid(N(mean, std))), discretised."""
    dev = rng_device(generator, device)
    if kind == "uniform":
        t = torch.randint(0, num_timesteps, (n,), generator=generator, device=dev)
    elif kind == "logit_normal":
        u = torch.sigmoid(standard_normal(n, generator, dev) * std + mean)
        t = (u * num_timesteps).long().clamp(0, num_timesteps - 1)
    else:
        raise ValueError(f"unknown timestep density '{kind}': choose one of {VP_DENSITIES}")
    return t.to(device) if device is not None else t
