"""Prediction targets, their conversions, loss weightings and the training objective.

Every sampler and the training loss convert model outputs through ``predictions_from_output`` so the eps / x0 / v
algebra lives in one place. ``ab`` is alpha-bar broadcast to the data shape.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
PREDICTIONS = ("eps", "x0", "v")


def add_noise(x0: Tensor, eps: Tensor, ab: Tensor) -> Tensor:
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def training_target(x0: Tensor, eps: Tensor, ab: Tensor, prediction: str) -> Tensor:
    """What the network regresses: eps, x0 or v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0
    raise ValueError(f"unknown prediction '{prediction}': choose one of {PREDICTIONS}")


def predictions_from_output(out: Tensor, x_t: Tensor, ab: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from a network output of the given prediction type."""
    a, s = ab.sqrt(), (1 - ab).sqrt()
    if prediction == "eps":
        return (x_t - s * out) / a, out
    if prediction == "x0":
        return out, (x_t - a * out) / s
    if prediction == "v":
        return a * x_t - s * out, s * x_t + a * out
    raise ValueError(f"unknown prediction '{prediction}': choose one of {PREDICTIONS}")


def clip_x0(x0: Tensor, mode: str | None = None, dynamic_quantile: float = 0.995, max_value: float = 1.0) -> Tensor:
    """Static clipping to [-max, max] or dynamic thresholding (Imagen: per-sample quantile s, clip to s, divide)."""
    if mode in (None, "none"):
        return x0
    if mode == "static":
        return x0.clamp(-max_value, max_value)
    if mode == "dynamic":
        flat = x0.detach().abs().reshape(x0.shape[0], -1).float()
        s = torch.quantile(flat, dynamic_quantile, dim=1).clamp(min=1.0, max=max_value if max_value > 1 else None)
        s = s.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return x0.clamp(-s, s) / s
    raise ValueError(f"unknown x0 clipping '{mode}': choose none, static or dynamic")


# ---- loss weightings: functions of SNR (per sample), in the units of the prediction's own MSE ----

def uniform_weight(snr: Tensor, prediction: str, **_) -> Tensor:
    """Every timestep weighs the same in the chosen prediction space."""
    return torch.ones_like(snr)


def min_snr_weight(snr: Tensor, prediction: str, gamma: float = 5.0, **_) -> Tensor:
    """Min-SNR-gamma (Hang et al.): eps min(snr,g)/snr; v min(snr,g)/(snr+1); x0 min(snr,g)."""
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr.clamp(min=1e-12)  # finite even at zero terminal SNR (weight -> 1 there)
    if prediction == "v":
        return clipped / (snr + 1)
    if prediction == "x0":
        return clipped
    raise ValueError(f"unknown prediction '{prediction}'")


def inv_snr_clamped_weight(snr: Tensor, prediction: str, snr_min: float = 0.1, snr_max: float = 10.0, **_) -> Tensor:
    """The research log's weighting: 1 / clamp(snr, min, max)."""
    return 1.0 / snr.clamp(min=snr_min, max=snr_max)


LOSS_WEIGHTINGS: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform_weight,
    "min_snr": min_snr_weight,
    "inv_snr_clamped": inv_snr_clamped_weight,
}


def elementwise_loss(pred: Tensor, target: Tensor, kind: str = "mse", huber_delta: float = 1.0) -> Tensor:
    """Per-sample mean of MSE, L1 or Huber over all non-batch dimensions."""
    if kind == "mse":
        err = (pred - target) ** 2
    elif kind == "l1":
        err = (pred - target).abs()
    elif kind == "huber":
        err = F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    else:
        raise ValueError(f"unknown loss '{kind}': choose mse, l1 or huber")
    return err.float().mean(dim=tuple(range(1, err.ndim)))


def sample_timesteps(n: int, num_timesteps: int, kind: str = "uniform", mean: float = 0.0, std: float = 1.0,
                     device=None, generator: torch.Generator | None = None) -> Tensor:
    """Training timesteps: uniform over [0, T) or logit-normal (SD3) mapped onto the discrete steps."""
    if kind == "uniform":
        return torch.randint(0, num_timesteps, (n,), generator=generator).to(device)
    if kind == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator) * std + mean)
        return (u * num_timesteps).long().clamp(0, num_timesteps - 1).to(device)
    raise ValueError(f"unknown timestep sampling '{kind}': choose uniform or logit_normal")


def offset_noise_like(x: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise plus a per-sample, per-channel constant (offset noise) of the given strength."""
    eps = torch.randn(x.shape, generator=generator).to(x)
    if strength > 0:
        offset = torch.randn(x.shape[0], x.shape[1], *([1] * (x.ndim - 2)), generator=generator).to(x)
        eps = eps + strength * offset
    return eps


class Objective:
    """The training objective: prediction target, loss, weighting, timestep sampling and noise options."""

    def __init__(self, prediction: str = "eps", loss: str = "mse", weighting: str = "uniform",
                 min_snr_gamma: float = 5.0, snr_min: float = 0.1, snr_max: float = 10.0, huber_delta: float = 1.0,
                 timestep_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 offset_noise: float = 0.0, x0_clip: str | None = "static"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"objective.prediction='{prediction}' is unknown: choose one of {PREDICTIONS}")
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"objective.weighting='{weighting}' is unknown: choose one of {sorted(LOSS_WEIGHTINGS)}")
        self.prediction, self.loss, self.weighting = prediction, loss, weighting
        self.weight_kwargs = dict(gamma=min_snr_gamma, snr_min=snr_min, snr_max=snr_max)
        self.huber_delta = huber_delta
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, logit_mean, logit_std
        self.offset_noise = offset_noise
        self.x0_clip = x0_clip

    def weight(self, snr: Tensor) -> Tensor:
        """Per-sample loss weight at the given SNRs."""
        return LOSS_WEIGHTINGS[self.weighting](snr, self.prediction, **self.weight_kwargs)

    def losses(self, net: Callable[[Tensor, Tensor], Tensor], x0: Tensor, schedule, t: Tensor | None = None,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Noise x0 at timesteps t (sampled if None), run ``net(x_t, t)`` and return per-sample losses.

        Returns dict(loss=weighted per-sample loss, raw=unweighted loss, t=timesteps, x0_hat=predicted x0).
        """
        n = x0.shape[0]
        if t is None:
            t = sample_timesteps(n, schedule.num_timesteps, self.timestep_sampling, self.logit_mean, self.logit_std,
                                 device=x0.device, generator=generator)
        eps = offset_noise_like(x0, self.offset_noise, generator)
        ab = schedule.alpha_bar(t, like=x0)
        x_t = add_noise(x0, eps, ab)
        out = net(x_t, t)
        target = training_target(x0, eps, ab, self.prediction)
        raw = elementwise_loss(out.float(), target.float(), self.loss, self.huber_delta)
        snr = schedule.snr.to(x0.device)[t].float()
        w = self.weight(snr)
        x0_hat, _ = predictions_from_output(out.float(), x_t.float(), ab.float(), self.prediction)
        return {"loss": raw * w, "raw": raw, "t": t, "x0_hat": x0_hat}


def timestep_buckets(t: Tensor, num_timesteps: int, num_buckets: int = 10) -> Tensor:
    """Bucket index in [0, num_buckets) for each training timestep (equal-width buckets over [0, T))."""
    return (t.long() * num_buckets // num_timesteps).clamp(0, num_buckets - 1)
