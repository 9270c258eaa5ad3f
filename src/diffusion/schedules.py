"""Discrete noise schedules: beta / alpha-bar profiles, zero-terminal-SNR rescaling and sampling-timestep spacing.

Conventions: ``alphas_cumprod[t]`` (alpha-bar) is the signal fraction at training step ``t`` in ``[0, T)``;
``x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps``. SNR = alpha_bar / (1 - alpha_bar),
sigma (EDM / k-diffusion) = sqrt(1 / SNR). Everything is float64 on the CPU; callers gather and cast.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Tensor = torch.Tensor


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear betas (Ho et al.), taken as given for any T (the diffusers convention)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's 'scaled_linear': linear in sqrt(beta)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def betas_from_alpha_bar(alpha_bar: Callable[[Tensor], Tensor], num_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """Discretise a continuous alpha-bar(t in [0,1]) into betas, clipped at ``max_beta`` (improved DDPM)."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    ab = alpha_bar(t)
    return (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved-DDPM cosine schedule alpha_bar(t) = cos^2(((t + s) / (1 + s)) pi/2); diffusers' squaredcos_cap_v2."""
    return betas_from_alpha_bar(lambda t: torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2, num_timesteps, max_beta)


def sigmoid_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, width: float = 6.0) -> Tensor:
    """Sigmoid-shaped betas between beta_start and beta_end (GeoDiff / diffusers 'sigmoid')."""
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


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "leading", offset: int = 0) -> Tensor:
    """Descending subset of ``steps`` training timesteps, spaced as in diffusers ('leading', 'trailing', 'linspace')."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampler steps must be in [1, {num_timesteps}] (the schedule's num_timesteps); got {steps}")
    if spacing == "leading":
        ratio = num_timesteps // steps
        ts = torch.arange(steps, dtype=torch.float64) * ratio + offset
    elif spacing == "trailing":
        ratio = num_timesteps / steps
        ts = torch.arange(num_timesteps, 0, -ratio, dtype=torch.float64).round().flip(0) - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round()
    else:
        raise ValueError(f"unknown timestep spacing '{spacing}': choose leading, trailing or linspace")
    return ts.long().flip(0)


class DiscreteSchedule:
    """A T-step noise schedule. Holds float64 alpha-bar and derives SNR, log-SNR and sigmas from it."""

    def __init__(self, kind: str = "cosine", num_timesteps: int = 1000, zero_terminal_snr: bool = False,
                 spacing: str = "leading", **kind_kwargs):
        if kind not in BETA_SCHEDULES:
            raise ValueError(f"unknown schedule kind '{kind}': choose one of {sorted(BETA_SCHEDULES)}")
        betas = BETA_SCHEDULES[kind](num_timesteps, **kind_kwargs)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.kind = kind
        self.num_timesteps = num_timesteps
        self.zero_terminal_snr = zero_terminal_snr
        self.spacing = spacing
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)

    @property
    def snr(self) -> Tensor:
        ab = self.alphas_cumprod
        return ab / (1 - ab)

    @property
    def log_snr(self) -> Tensor:
        ab = self.alphas_cumprod
        return ab.log() - torch.log1p(-ab)

    @property
    def sigmas(self) -> Tensor:
        ab = self.alphas_cumprod
        return ((1 - ab) / ab).sqrt()

    def alpha_bar(self, t: Tensor, like: Tensor | None = None) -> Tensor:
        """alpha-bar at integer timesteps ``t``, shaped to broadcast against ``like`` (B x ...) if given."""
        ab = self.alphas_cumprod.to(t.device)[t.long()]
        if like is not None:
            ab = ab.to(like.dtype if like.is_floating_point() else torch.float32).reshape(-1, *([1] * (like.ndim - 1)))
        return ab

    def sampling_timesteps(self, steps: int, spacing: str | None = None) -> Tensor:
        """Descending timesteps for a ``steps``-step sampler, using this schedule's spacing unless one is given."""
        return spaced_timesteps(self.num_timesteps, steps, spacing or self.spacing)

    def __repr__(self) -> str:
        return (f"DiscreteSchedule(kind={self.kind}, T={self.num_timesteps}, "
                f"zero_terminal_snr={self.zero_terminal_snr}, spacing={self.spacing})")
