"""Discrete noise schedules (the ``vp`` process): beta / alpha-bar profiles, zero-terminal-SNR rescaling, timestep
spacing and the training-timestep density.

Conventions: ``alphas_cumprod[t]`` (alpha-bar) is the signal fraction at training step ``t`` in ``[0, T)``;
``x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps``. SNR = alpha_bar / (1 - alpha_bar), log-SNR its log, and
sigma (EDM / k-diffusion, variance-exploding units) = sqrt(1 / SNR). Everything is float64 on the CPU; callers
gather and cast. With zero terminal SNR the last alpha-bar is exactly 0 (SNR 0, log-SNR -inf, sigma inf): samplers
handle that limit explicitly instead of clamping it away.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

from difflab.diffusion.processes import NoiseProcess, rng_device, standard_normal

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


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999,
                 logsnr_shift: float = 0.0) -> Tensor:
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


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "leading", offset: int = 0,
                     exclude_zero: bool = False) -> Tensor:
    """Descending subset of ``steps`` training timesteps, spaced as in diffusers ('leading', 'trailing', 'linspace').

    ``exclude_zero`` is the multistep-solver (DPM-Solver) convention: leading / linspace place ``steps + 1`` points
    and drop the one at t = 0, because the solver's last step goes from the smallest kept timestep to sigma = 0.
    Trailing spacing is the same either way. ``offset`` is diffusers' ``steps_offset`` (leading only).
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing '{spacing}': choose one of {SPACINGS}")
    extra = 1 if exclude_zero and spacing != "trailing" else 0
    if not 1 <= steps + extra <= num_timesteps:
        raise ValueError(f"sampler steps must be in [1, {num_timesteps - extra}] for a schedule with num_timesteps="
                         f"{num_timesteps} and spacing '{spacing}'; got {steps}")
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


def _check_kind_kwargs(kind: str, kwargs: dict) -> None:
    allowed = [p for p in inspect.signature(BETA_SCHEDULES[kind]).parameters if p != "num_timesteps"]
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise ValueError(f"schedule kind '{kind}' does not take {bad}; its settings are {allowed} "
                         f"(remove the key or pick another schedule=)")


def sample_timesteps(n: int, num_timesteps: int, kind: str = "uniform", mean: float = 0.0, std: float = 1.0,
                     device=None, generator: torch.Generator | None = None) -> Tensor:
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


class DiscreteSchedule(NoiseProcess):
    """The ``vp`` process: a T-step noise schedule holding float64 alpha-bar, with SNR, log-SNR and sigmas from it.

    Process time is the integer training step t in [0, T) (clean data: -1); the denoiser sees t itself.
    ``spacing`` is the default timestep spacing samplers use: ``trailing`` (the default) starts at t = T - 1, the
    noise end, which sampling from pure noise needs (and zero terminal SNR requires, Lin et al.); ``leading`` starts
    at T - T / steps. ``density`` draws training timesteps (uniform, or logit-normal with ``logit_mean/std``).
    """

    name = "vp"
    clean_time = -1.0
    has_ancestral = True
    continuous = False

    def __init__(self, kind: str = "cosine", num_timesteps: int = 1000, zero_terminal_snr: bool = False,
                 spacing: str = "trailing", steps_offset: int = 0, density: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, **kind_kwargs):
        if kind not in BETA_SCHEDULES:
            raise ValueError(f"unknown schedule kind '{kind}': choose one of {sorted(BETA_SCHEDULES)}")
        if int(num_timesteps) < 2:
            raise ValueError(f"schedule.num_timesteps must be >= 2, got {num_timesteps}")
        if spacing not in SPACINGS:
            raise ValueError(f"schedule.spacing='{spacing}' is unknown: choose one of {SPACINGS}")
        if density not in VP_DENSITIES:
            raise ValueError(f"schedule.density='{density}' is unknown: choose one of {VP_DENSITIES}")
        _check_kind_kwargs(kind, kind_kwargs)
        self.density, self.logit_mean, self.logit_std = density, float(logit_mean), float(logit_std)
        betas = BETA_SCHEDULES[kind](int(num_timesteps), **kind_kwargs)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.kind = kind
        self.kind_kwargs = dict(kind_kwargs)
        self.num_timesteps = int(num_timesteps)
        self.zero_terminal_snr = bool(zero_terminal_snr)
        self.spacing = spacing
        self.steps_offset = int(steps_offset)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, spacing: str = "trailing", steps_offset: int = 0) -> "DiscreteSchedule":
        """A schedule from given alpha-bars (e.g. another library's scheduler), kept exactly as given (float64)."""
        ab = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).flatten()
        if ab.numel() < 2 or not bool(((ab >= 0) & (ab < 1)).all()):
            raise ValueError("alphas_cumprod must hold at least 2 values in [0, 1)")
        self = cls.__new__(cls)
        self.kind, self.kind_kwargs = "custom", {}
        self.num_timesteps = ab.numel()
        self.zero_terminal_snr = bool(ab[-1] == 0)
        if spacing not in SPACINGS:
            raise ValueError(f"spacing='{spacing}' is unknown: choose one of {SPACINGS}")
        self.spacing, self.steps_offset = spacing, int(steps_offset)
        self.density, self.logit_mean, self.logit_std = "uniform", 0.0, 1.0
        self.alphas_cumprod = ab.clone()
        self.betas = 1 - torch.cat([ab[:1], ab[1:] / ab[:-1].clamp(min=1e-300)])
        return self

    @property
    def snr(self) -> Tensor:
        """alpha_bar / (1 - alpha_bar) per timestep (0 at the end with zero terminal SNR)."""
        ab = self.alphas_cumprod
        return ab / (1 - ab)

    @property
    def log_snr(self) -> Tensor:
        """log SNR per timestep (-inf at the end with zero terminal SNR)."""
        ab = self.alphas_cumprod
        return ab.log() - torch.log1p(-ab)

    @property
    def sigmas(self) -> Tensor:
        """Variance-exploding noise level sqrt((1 - ab) / ab) per timestep (inf at the end with zero terminal SNR)."""
        ab = self.alphas_cumprod
        return ((1 - ab) / ab).sqrt()

    def alpha_bar(self, t: Tensor, like: Tensor | None = None) -> Tensor:
        """alpha-bar at integer timesteps ``t``, shaped to broadcast against ``like`` (B x ...) if given."""
        t = torch.as_tensor(t)
        ab = self.alphas_cumprod.to(t.device)[t.long()]
        if like is not None:
            ab = ab.to(like.dtype if like.is_floating_point() else torch.float32).reshape(-1, *([1] * (like.ndim - 1)))
        return ab

    def sampling_timesteps(self, steps: int, spacing: str | None = None, exclude_zero: bool = False) -> Tensor:
        """Descending timesteps for a ``steps``-step sampler, using this schedule's spacing unless one is given."""
        return spaced_timesteps(self.num_timesteps, int(steps), spacing or self.spacing, self.steps_offset,
                                exclude_zero=exclude_zero)

    # ---- the process interface ----
    def coefficients(self, t):
        """(sqrt(alpha_bar[t]), sqrt(1 - alpha_bar[t])) at integer steps t; (1, 0) at the clean end t < 0."""
        t = torch.as_tensor(t, dtype=torch.float64)
        table = self.alphas_cumprod.to(t.device)
        ab = table[t.round().long().clamp(0, self.num_timesteps - 1)]
        ab = torch.where(t < 0, torch.ones_like(ab), ab)
        return ab.sqrt(), (1 - ab).sqrt()

    def net_time(self, t):
        return torch.as_tensor(t).float()

    def time_from_net_time(self, t_net):
        return torch.as_tensor(t_net).double()

    def sample_times(self, n, device=None, generator=None):
        return sample_timesteps(n, self.num_timesteps, self.density, self.logit_mean, self.logit_std, device=device,
                                generator=generator).double()

    def sampling_times(self, steps, spacing=None, multistep=False):
        """The spaced timesteps (multistep solvers: the ``exclude_zero`` grid, as diffusers), then clean (-1)."""
        ts = self.sampling_timesteps(steps, spacing, exclude_zero=multistep).double()
        return torch.cat([ts, ts.new_full((1,), self.clean_time)])

    def time_at_fraction(self, frac):
        return float(min(self.num_timesteps - 1, max(0, round(float(frac) * self.num_timesteps))))

    def time_from_log_snr(self, log_snr):
        """The step whose log-SNR is nearest (log-SNR falls with t)."""
        target = torch.as_tensor(log_snr, dtype=torch.float64)
        table = self.log_snr.to(target.device)
        return (table[None, :] - target.reshape(-1, 1)).abs().argmin(dim=1).reshape(target.shape).double()

    @property
    def reaches_pure_noise(self) -> bool:
        """With zero terminal SNR the last step has alpha = 0."""
        return self.zero_terminal_snr

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.kind_kwargs.items())
        return (f"DiscreteSchedule(vp, kind={self.kind}, T={self.num_timesteps}, "
                f"zero_terminal_snr={self.zero_terminal_snr}, spacing={self.spacing}{extra})")
