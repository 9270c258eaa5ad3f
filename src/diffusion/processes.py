"""Noise processes: one affine path x_t = alpha(t) x0 + sigma(t) eps, three ways to walk it.

A process owns everything about *time*: the path coefficients alpha(t), sigma(t) (and d/dt where a target needs
them), the time input the denoiser sees, the training-time density and the sampling time grid. Everything else
(prediction targets, loss weightings, guidance, samplers) is written once against this interface, so a new process
is one class here plus one ``configs/process/<name>.yaml``.

Time runs from ``clean_time`` (data) to the noise end; sampling grids descend and end at ``clean_time``.

- ``vp`` (:class:`VPProcess`, beta tables from ``difflab.diffusion.schedules``): DDPM-family; t is the integer
  training step in [0, T) (clean data is t = -1), alpha = sqrt(alpha_bar[t]), sigma = sqrt(1 - alpha_bar[t]).
- ``edm`` (:class:`EDMProcess`, Karras et al. 2022): t is sigma itself, alpha = 1, sigma = t in
  [sigma_min, sigma_max]; log-normal training sigmas, Karras rho grid.
- ``flow`` (:class:`FlowProcess`, rectified flow / flow matching, SD3 convention): t in [0, 1], t = 1 is noise,
  alpha = 1 - t, sigma = t; uniform / logit-normal / mode / cosmap densities and the resolution shift.

Two derived quantities make every process comparable: log-SNR = 2 log(alpha / sigma), and the variance-exploding
noise level sigma_ve = sigma / alpha (EDM's sigma; k-diffusion's). The guidance interval is stated in sigma_ve.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch.types import Device

from difflab.diffusion.draws import rng_device, standard_normal, standard_uniform
from difflab.diffusion.schedules import (
    BETA_SCHEDULES,
    SPACINGS,
    VP_DENSITIES,
    check_kind_kwargs,
    rescale_zero_terminal_snr,
    sample_timesteps,
    spaced_timesteps,
)

if TYPE_CHECKING:
    import numpy.typing as npt

Tensor = torch.Tensor
# sampler.spacing: vp's timestep spacing (leading | trailing | linspace), flow's grid shift (a number), or None
Spacing = str | float | None
__all__ = [
    "NoiseProcess",
    "VPProcess",
    "EDMProcess",
    "FlowProcess",
    "PROCESSES",
    "rng_device",
    "standard_normal",
    "standard_uniform",
]
ODE_FRAMES = ("sigma", "t")


class NoiseProcess:
    """The interface every process implements (see the module docstring). Times are float64 tensors."""

    name = "process"
    clean_time = 0.0
    # Coordinates in which Euler / Heun integrate the probability-flow ODE: "sigma" = state x / alpha over
    # sigma_ve (k-diffusion / EDM), "t" = state x over t (flow matching, needs alpha + sigma = 1).
    ode_frame = "sigma"
    has_ancestral = False  # whether DDPM's ancestral sampler is defined (a Markov chain of discrete steps)
    continuous = True  # whether coefficients exist between grid points (stochastic churn needs it)
    prior_std = 1.0  # samplers start from N(0, prior_std^2 I)
    reaches_pure_noise = False  # alpha = 0 at the noise end (x0 is not identifiable from an eps prediction there)
    # The objective this process trains unless the objective states its own (configs/objective/*.yaml interpolate
    # them): None where the objective group chooses (vp).
    prediction: str | None = None
    weighting: str | None = None

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)) as float64 tensors shaped like ``t``."""
        raise NotImplementedError

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(d alpha / dt, d sigma / dt): what a velocity target needs."""
        raise NotImplementedError(f"process '{self.name}' defines no time derivatives (needed by a velocity target)")

    def net_time(self, t: Tensor) -> Tensor:
        """The time input the denoiser sees (float32), on a scale its sinusoidal embedding resolves (~[0, 1000])."""
        raise NotImplementedError

    def time_from_net_time(self, t_net: Tensor) -> Tensor:
        """The inverse of ``net_time`` (float64): for reference denoisers that are handed the network's inputs."""
        raise NotImplementedError

    def sample_times(self, n: int, device: Device = None, generator: torch.Generator | None = None) -> Tensor:
        """``n`` training times drawn from the process's training density."""
        raise NotImplementedError

    def sampling_times(self, steps: int, spacing: Spacing = None, multistep: bool = False) -> Tensor:
        """Descending times of a ``steps``-step sampler, ending with ``clean_time`` (``steps + 1`` entries);
        ``spacing`` (``sampler.spacing``) replaces the process's own grid rule where it has one."""
        raise NotImplementedError

    def time_from_sigma_ve(self, sigma_ve: float) -> float:
        """The time whose sigma / alpha is ``sigma_ve`` (stochastic churn and starting points need it)."""
        raise NotImplementedError(f"process '{self.name}' has no continuous inverse of sigma")

    def time_at_fraction(self, frac: float) -> float:
        """A time ``frac`` of the way from clean data (0) to the noise end (1), for diagnostics."""
        raise NotImplementedError

    def time_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """The times at which the path has these log-SNRs (the nearest grid step on a discrete process), so that
        every process can be evaluated at the same noise levels."""
        raise NotImplementedError

    # ---- derived, the same for every process ----
    def log_snr_at(self, t: Tensor) -> Tensor:
        """log(alpha^2 / sigma^2): +inf at clean data, -inf at pure noise."""
        alpha, sigma = self.coefficients(torch.as_tensor(t, dtype=torch.float64))
        return 2 * (alpha.log() - sigma.log())

    def sigma_ve_at(self, t: Tensor | float) -> Tensor:
        """sigma / alpha, the variance-exploding (EDM) noise level: inf at pure noise, 0 at clean data."""
        alpha, sigma = self.coefficients(torch.as_tensor(t, dtype=torch.float64))
        return torch.where(alpha > 0, sigma / alpha.clamp(min=1e-300), torch.full_like(sigma, math.inf))

    def coefficients_like(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha, sigma) shaped to broadcast against ``like`` (B x ...), in its dtype."""
        alpha, sigma = self.coefficients(torch.as_tensor(t, dtype=torch.float64, device=like.device))
        shape = (-1, *([1] * (like.ndim - 1)))
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return alpha.to(dtype).reshape(shape), sigma.to(dtype).reshape(shape)

    def describe(self) -> str:
        return repr(self)


class VPProcess(NoiseProcess):
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

    def __init__(
        self,
        kind: str = "cosine",
        num_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
        spacing: str = "trailing",
        steps_offset: int = 0,
        density: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        **kind_kwargs: Any,
    ) -> None:
        if kind not in BETA_SCHEDULES:
            raise ValueError(f"unknown schedule kind '{kind}': choose one of {sorted(BETA_SCHEDULES)}")
        if int(num_timesteps) < 2:
            raise ValueError(f"schedule.num_timesteps must be >= 2, got {num_timesteps}")
        if spacing not in SPACINGS:
            raise ValueError(f"schedule.spacing='{spacing}' is unknown: choose one of {SPACINGS}")
        if density not in VP_DENSITIES:
            raise ValueError(f"schedule.density='{density}' is unknown: choose one of {VP_DENSITIES}")
        check_kind_kwargs(kind, kind_kwargs)
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
    def from_alphas_cumprod(
        cls, alphas_cumprod: Tensor | npt.ArrayLike, spacing: str = "trailing", steps_offset: int = 0
    ) -> "VPProcess":
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
        return spaced_timesteps(
            self.num_timesteps, int(steps), spacing or self.spacing, self.steps_offset, exclude_zero=exclude_zero
        )

    # ---- the process interface ----
    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(alpha_bar[t]), sqrt(1 - alpha_bar[t])) at integer steps t; (1, 0) at the clean end t < 0."""
        t = torch.as_tensor(t, dtype=torch.float64)
        table = self.alphas_cumprod.to(t.device)
        ab = table[t.round().long().clamp(0, self.num_timesteps - 1)]
        ab = torch.where(t < 0, torch.ones_like(ab), ab)
        return ab.sqrt(), (1 - ab).sqrt()

    def net_time(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t).float()

    def time_from_net_time(self, t_net: Tensor) -> Tensor:
        return torch.as_tensor(t_net).double()

    def sample_times(self, n: int, device: Device = None, generator: torch.Generator | None = None) -> Tensor:
        return sample_timesteps(
            n, self.num_timesteps, self.density, self.logit_mean, self.logit_std, device=device, generator=generator
        ).double()

    def sampling_times(self, steps: int, spacing: Spacing = None, multistep: bool = False) -> Tensor:
        """The spaced timesteps (multistep solvers: the ``exclude_zero`` grid, as diffusers), then clean (-1)."""
        if spacing is not None and not isinstance(spacing, str):
            raise ValueError(
                f"sampler.spacing={spacing!r} does not apply to process=vp: give leading | trailing | linspace or null "
                "(a number is flow's grid shift)"
            )
        ts = self.sampling_timesteps(steps, spacing, exclude_zero=multistep).double()
        return torch.cat([ts, ts.new_full((1,), self.clean_time)])

    def time_at_fraction(self, frac: float) -> float:
        return float(min(self.num_timesteps - 1, max(0, round(float(frac) * self.num_timesteps))))

    def time_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """The step whose log-SNR is nearest (log-SNR falls with t)."""
        target = torch.as_tensor(log_snr, dtype=torch.float64)
        table = self.log_snr.to(target.device)
        return (table[None, :] - target.reshape(-1, 1)).abs().argmin(dim=1).reshape(target.shape).double()

    @property  # vp derives the class constant from its table (read-only here)
    def reaches_pure_noise(self) -> bool:  # type: ignore[override]
        """With zero terminal SNR the last step has alpha = 0."""
        return self.zero_terminal_snr

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.kind_kwargs.items())
        return (
            f"VPProcess(kind={self.kind}, T={self.num_timesteps}, "
            f"zero_terminal_snr={self.zero_terminal_snr}, spacing={self.spacing}{extra})"
        )


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al.'s grid sigma_i = (smax^(1/rho) + i / (N - 1) (smin^(1/rho) - smax^(1/rho)))^rho, then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


class EDMProcess(NoiseProcess):
    """EDM (Karras et al. 2022): x = x0 + sigma eps with t = sigma; log-normal training sigmas, Karras grid.

    The denoiser sees c_noise = ln(sigma) / 4 (EDM's) times ``time_scale`` (default 1000, so sigma in [0.002, 80]
    spans about [-1550, 1100], a range the sinusoidal time embeddings of difflab's denoisers resolve).
    """

    name = "edm"

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        time_scale: float = 1000.0,
        prediction: str = "edm",
        weighting: str = "edm",
    ) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"process.sigma_min / sigma_max need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}"
            )
        if rho <= 0 or p_std <= 0:
            raise ValueError(f"process.rho and process.p_std must be > 0; got {rho}, {p_std}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.prior_std = self.sigma_max
        self.p_mean, self.p_std, self.time_scale = float(p_mean), float(p_std), float(time_scale)
        self.prediction, self.weighting = prediction, weighting

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.ones_like(t), t

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.zeros_like(t), torch.ones_like(t)

    def net_time(self, t: Tensor) -> Tensor:
        return (torch.as_tensor(t).double().log() / 4 * self.time_scale).float()

    def time_from_net_time(self, t_net: Tensor) -> Tensor:
        return (torch.as_tensor(t_net).double() * 4 / self.time_scale).exp()

    def sample_times(self, n: int, device: Device = None, generator: torch.Generator | None = None) -> Tensor:
        return (standard_normal(n, generator, device) * self.p_std + self.p_mean).exp()

    def sampling_times(self, steps: int, spacing: Spacing = None, multistep: bool = False) -> Tensor:
        return karras_sigmas(int(steps), self.sigma_min, self.sigma_max, self.rho)

    def time_from_sigma_ve(self, sigma_ve: float) -> float:
        return float(sigma_ve)

    def time_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return (-torch.as_tensor(log_snr, dtype=torch.float64) / 2).exp()

    def time_at_fraction(self, frac: float) -> float:
        """Fractions interpolate log-sigma between sigma_min (0) and sigma_max (1)."""
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return math.exp(lo + float(frac) * (hi - lo))

    def __repr__(self) -> str:
        return (
            f"EDMProcess(sigma=[{self.sigma_min}, {self.sigma_max}], rho={self.rho}, "
            f"ln sigma ~ N({self.p_mean}, {self.p_std}^2))"
        )


FLOW_DENSITIES = ("uniform", "logit_normal", "mode", "cosmap")


def shift_time(t: Tensor, shift: float | Tensor) -> Tensor:
    """SD3's resolution shift t' = a t / (1 + (a - 1) t) (a = sqrt(pixels / base pixels); 1 = none). ``shift`` may be
    a tensor broadcasting against ``t`` (one shift per sample)."""
    if isinstance(shift, Tensor):
        shift = shift.to(t.dtype)
        return shift * t / (1 + (shift - 1) * t)
    return shift * t / (1 + (shift - 1) * t) if shift != 1.0 else t


def frame_shift(
    base_shift: float | Tensor,
    num_frames: int | Tensor,
    base_frames: int,
    pixels: int | Tensor | None = None,
    base_pixels: int | None = None,
) -> float | Tensor:
    """The flow time shift of a clip of ``num_frames`` frames: ``base_shift * sqrt(num_frames / base_frames)``, and
    times ``sqrt(pixels / base_pixels)`` when both are given.

    Open-Sora's rule (``opensora/schedulers/rf/rectified_flow.py`` ``timestep_transform``, v1.2; moved to
    ``rf/time_sampler.py`` in v1.3): ``ratio = sqrt(H W / base_resolution) * sqrt(T' / base_num_frames)`` with
    ``T'`` the latent frame count of their VAE, then ``t' = ratio t / (1 + (ratio - 1) t)`` (`shift_time`).
    ``base_shift`` is the shift at ``base_frames`` frames (``process.shift``, itself the resolution factor), so
    ``frame_shift(sqrt(HW / base_res), T', base_num_frames)`` is Open-Sora's ratio. ``num_frames`` counts frames as
    the model sees them (latent frames for a temporally compressing autoencoder).
    """
    if isinstance(num_frames, Tensor):
        ratio: float | Tensor = (num_frames.to(torch.float64) / float(base_frames)).sqrt()
    else:
        ratio = math.sqrt(float(num_frames) / float(base_frames))
    if pixels is not None and base_pixels is not None:
        if isinstance(pixels, Tensor):
            ratio = ratio * (pixels.to(torch.float64) / float(base_pixels)).sqrt()
        else:
            ratio = ratio * math.sqrt(float(pixels) / float(base_pixels))
    return base_shift * ratio


def flow_density(
    u: Tensor, n: Tensor, kind: str, mean: float = 0.0, std: float = 1.0, mode_scale: float = 1.29
) -> Tensor:
    """Map uniform ``u`` / standard normal ``n`` draws to t in [0, 1] with one of SD3's densities (Esser et al. 2024).

    logit_normal: t = sigmoid(mean + std n); mode: t = 1 - u - s (cos^2(pi u / 2) - 1 + u);
    cosmap: t = 1 - 1 / (tan(pi u / 2) + 1); uniform: t = u.
    """
    if kind == "uniform":
        return u
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * n)
    if kind == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if kind == "cosmap":
        return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
    raise ValueError(f"process.density='{kind}' is unknown: choose one of {FLOW_DENSITIES}")


class FlowProcess(NoiseProcess):
    """Rectified flow / flow matching on the linear path x_t = (1 - t) x0 + t eps (t = 1 is noise, SD3's direction).

    Training times come from ``density`` (uniform, logit_normal(mean, std), mode(mode_scale), cosmap), then the
    resolution ``shift``. The sampling grid is diffusers' FlowMatchEulerDiscreteScheduler's (and SD3.5's reference
    sampler's): ``shift`` applied to ``steps`` points spaced evenly from 1 down to shift(``t_min``) (default t_min
    1 / 1000), then 0; its lowest nonzero time is shift(shift(t_min)) (0.00893 at shift 3; t_min itself at shift 1).
    ``sampling_shift`` replaces ``shift`` on the sampling grid only (None: ``shift``; below 1 spends the steps nearer
    clean data, which small images want), and a number in ``sampler.spacing`` replaces both for one sampling call.
    The denoiser sees ``time_scale * t`` (1000 t, as SD3).
    """

    name = "flow"
    ode_frame = "t"
    reaches_pure_noise = True  # t = 1: alpha = 0

    def __init__(
        self,
        density: str = "logit_normal",
        mean: float = 0.0,
        std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
        t_min: float = 1e-3,
        time_scale: float = 1000.0,
        frame_shift_base: int | None = None,
        prediction: str = "flow",
        weighting: str = "uniform",
        sampling_shift: float | None = None,
    ) -> None:
        if density not in FLOW_DENSITIES:
            raise ValueError(f"process.density='{density}' is unknown: choose one of {FLOW_DENSITIES}")
        if shift <= 0 or std <= 0 or not 0 <= t_min < 1:
            raise ValueError(f"process needs shift > 0, std > 0 and 0 <= t_min < 1; got {shift}, {std}, {t_min}")
        if frame_shift_base is not None and (isinstance(frame_shift_base, bool) or int(frame_shift_base) < 1):
            raise ValueError(f"process.frame_shift_base must be a frame count >= 1 or null, got {frame_shift_base!r}")
        self.density, self.mean, self.std, self.mode_scale = density, float(mean), float(std), float(mode_scale)
        self.shift, self.t_min, self.time_scale = float(shift), float(t_min), float(time_scale)
        # training times of a video batch of T frames use frame_shift(shift, T, frame_shift_base) (None: shift)
        self.frame_shift_base = None if frame_shift_base is None else int(frame_shift_base)
        self.prediction, self.weighting = prediction, weighting
        self.sampling_shift = (
            None if sampling_shift is None else self.grid_shift(sampling_shift, "process.sampling_shift")
        )

    def grid_shift(self, spacing: Spacing = None, key: str = "sampler.spacing") -> float:
        """The sampling grid's shift: ``spacing`` if it is a number, else ``sampling_shift``, else ``shift``."""
        if spacing is None:
            return self.shift if self.sampling_shift is None else self.sampling_shift
        if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not spacing > 0:
            raise ValueError(
                f"{key}={spacing!r} does not apply to process=flow: give the sampling grid's shift, a number > 0 "
                "(below 1 puts more steps near clean data), or null"
            )
        return float(spacing)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        return 1 - t, t

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        return -torch.ones_like(t), torch.ones_like(t)

    def net_time(self, t: Tensor) -> Tensor:
        return (torch.as_tensor(t).double() * self.time_scale).float()

    def time_from_net_time(self, t_net: Tensor) -> Tensor:
        return torch.as_tensor(t_net).double() / self.time_scale

    def sample_times(
        self,
        n: int,
        device: Device = None,
        generator: torch.Generator | None = None,
        shift: float | Tensor | None = None,
    ) -> Tensor:
        """``n`` training times; ``shift`` (a number, or one per sample) replaces ``self.shift`` for this draw."""
        u = standard_uniform(n, generator, device)
        z = standard_normal(n, generator, device) if self.density == "logit_normal" else u
        t = flow_density(u, z, self.density, self.mean, self.std, self.mode_scale)
        if isinstance(shift, Tensor):
            shift = shift.to(t.device)
        return shift_time(t, self.shift if shift is None else shift).clamp(0, 1)

    def sampling_times(self, steps: int, spacing: Spacing = None, multistep: bool = False) -> Tensor:
        """``steps`` points evenly spaced from 1 down to s(t_min), shifted by s, then 0, with s = ``grid_shift``:
        diffusers' FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(steps) grid (its lower end shifted twice).
        ``t_min = 0``: ``steps + 1`` points evenly spaced from 1 to 0, shifted, so the grids of N and 2 N steps nest
        (progressive distillation's)."""
        s = self.grid_shift(spacing)
        if self.t_min == 0:
            return shift_time(torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64), s)
        lowest = float(shift_time(torch.tensor(self.t_min, dtype=torch.float64), s))
        u = torch.linspace(1.0, lowest, int(steps), dtype=torch.float64)
        return torch.cat([shift_time(u, s), u.new_zeros(1)])

    def time_from_sigma_ve(self, sigma_ve: float) -> float:
        return float(sigma_ve) / (1 + float(sigma_ve)) if math.isfinite(sigma_ve) else 1.0

    def time_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return torch.sigmoid(-torch.as_tensor(log_snr, dtype=torch.float64) / 2)

    def time_at_fraction(self, frac: float) -> float:
        return float(shift_time(torch.tensor(float(frac), dtype=torch.float64), self.shift))

    def __repr__(self) -> str:
        per_frames = "" if self.frame_shift_base is None else f" x sqrt(T / {self.frame_shift_base})"
        grid = "" if self.sampling_shift is None else f", sampling_shift={self.sampling_shift}"
        return f"FlowProcess(density={self.density}, shift={self.shift}{per_frames}{grid})"


PROCESSES: dict[str, type[NoiseProcess]] = {"vp": VPProcess, "edm": EDMProcess, "flow": FlowProcess}
