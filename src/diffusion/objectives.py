"""Prediction targets, their conversions, loss weightings and the training objective.

Every sampler and the training loss convert model outputs through ``predictions_from_output`` so the eps / x0 / v
algebra lives in one place. ``ab`` is alpha-bar broadcast to the data shape.

Loss weightings are functions of the per-sample SNR, expressed in the units of the chosen target's own loss. For
MSE the three targets' errors are related by ``|eps err|^2 = snr |x0 err|^2`` and ``|v err|^2 = (snr + 1) |x0 err|^2``,
which is why min-SNR-gamma has a different form per target (Hang et al. 2023).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from difflab.utils.frozen import Frozen

Tensor = torch.Tensor
PREDICTIONS = ("eps", "x0", "v")
LOSSES = ("mse", "l1", "huber")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
CLIP_MODES = ("none", "static", "dynamic")
# eps -> x0 divides by sqrt(alpha_bar); at zero terminal SNR (alpha_bar = 0) x0 is not identifiable from an eps
# prediction, so the division uses this floor (fp16's smallest subnormal, the value diffusers uses there).
ALPHA_BAR_FLOOR = 2.0**-24


def add_noise(x0: Tensor, eps: Tensor, ab: Tensor) -> Tensor:
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def training_target(x0: Tensor, eps: Tensor, ab: Tensor, prediction: str) -> Tensor:
    """What the network regresses: eps, x0 or v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho).

    Also the inverse of ``predictions_from_output``: the output a ``prediction``-type network gives for (x0, eps).
    """
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0
    raise ValueError(f"unknown prediction '{prediction}': choose one of {PREDICTIONS}")


def predictions_from_output(out: Tensor, x_t: Tensor, ab: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from a network output of the given prediction type, consistent with x_t.

    Finite at both ends of every schedule: eps-prediction at alpha_bar = 0 exactly (zero terminal SNR, where x0 is
    not identifiable from eps) divides by sqrt(ALPHA_BAR_FLOOR) instead of 0; every other alpha_bar is used as is.
    """
    a, s = ab.sqrt(), (1 - ab).sqrt()
    if prediction == "eps":
        return (x_t - s * out) / torch.where(ab > 0, ab, torch.full_like(ab, ALPHA_BAR_FLOOR)).sqrt(), out
    if prediction == "x0":
        return out, (x_t - a * out) / s
    if prediction == "v":
        return a * x_t - s * out, s * x_t + a * out
    raise ValueError(f"unknown prediction '{prediction}': choose one of {PREDICTIONS}")


def eps_from_x0(x_t: Tensor, x0: Tensor, ab: Tensor) -> Tensor:
    """The noise consistent with x_t and a (possibly clipped) x0: (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def _abs_quantile(x: Tensor, q: float) -> Tensor:
    """Per-sample q-quantile of |x| over all non-batch dims (torch.quantile; kth value for very large samples)."""
    flat = x.detach().abs().reshape(x.shape[0], -1).float()
    if flat.shape[1] <= 2**24:
        return torch.quantile(flat, q, dim=1)
    k = max(1, min(flat.shape[1], math.ceil(q * flat.shape[1])))
    return flat.kthvalue(k, dim=1).values


def clip_x0(x0: Tensor, mode: str | None = "static", clip_range: float = 1.0, dynamic_quantile: float = 0.995,
            dynamic_max: float | None = None) -> Tensor:
    """Static clipping to [-clip_range, clip_range] or dynamic thresholding (Imagen, Saharia et al. 2022).

    Dynamic: s = per-sample ``dynamic_quantile`` of |x0|, s = max(s, 1) (and min(s, dynamic_max) if given, which
    is diffusers' ``sample_max_value``), then x0 -> clamp(x0, -s, s) / s.
    """
    if mode in (None, "none"):
        return x0
    if mode == "static":
        return x0.clamp(-clip_range, clip_range)
    if mode == "dynamic":
        s = _abs_quantile(x0, dynamic_quantile).clamp(min=1.0)
        if dynamic_max is not None:
            s = s.clamp(max=dynamic_max)
        s = s.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.minimum(torch.maximum(x0, -s), s) / s
    raise ValueError(f"unknown x0 clipping '{mode}': choose one of {CLIP_MODES}")


@dataclass(frozen=True)
class X0Clip:
    """The configured x0 clipping, applied by the guided model function at sampling time (never in training)."""

    mode: str = "static"
    clip_range: float = 1.0
    dynamic_quantile: float = 0.995
    dynamic_max: float | None = None

    def __post_init__(self):
        if self.mode not in CLIP_MODES:
            raise ValueError(f"objective.x0_clip='{self.mode}' is unknown: choose one of {CLIP_MODES}")

    def __call__(self, x0: Tensor) -> Tensor:
        return clip_x0(x0, self.mode, self.clip_range, self.dynamic_quantile, self.dynamic_max)

    def __str__(self) -> str:
        return self.mode


# ---- loss weightings: functions of SNR (per sample), in the units of the prediction's own loss ----

def uniform_weight(snr: Tensor, prediction: str, **_) -> Tensor:
    """Every timestep weighs the same in the chosen prediction space."""
    return torch.ones_like(snr)


def min_snr_weight(snr: Tensor, prediction: str, gamma: float = 5.0, **_) -> Tensor:
    """Min-SNR-gamma (Hang et al.): x0-space weight min(snr, g), so eps: min(snr,g)/snr, v: min(snr,g)/(snr+1).

    The eps form is written gamma / max(snr, gamma), which equals min(snr, g) / snr and is exactly 1 (not 0 / 0) at
    zero terminal SNR. The v and x0 forms are 0 there (the last step's x0 error is not weighted).
    """
    if prediction == "eps":
        return gamma / snr.clamp(min=gamma)
    if prediction == "v":
        return snr.clamp(max=gamma) / (snr + 1)
    if prediction == "x0":
        return snr.clamp(max=gamma)
    raise ValueError(f"unknown prediction '{prediction}': choose one of {PREDICTIONS}")


def inv_snr_clamped_weight(snr: Tensor, prediction: str, snr_min: float = 0.1, snr_max: float = 10.0, **_) -> Tensor:
    """The research log's hand-made weighting 1 / clamp(snr, snr_min, snr_max), the same for every target."""
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
        raise ValueError(f"unknown loss '{kind}': choose one of {LOSSES}")
    return err.float().mean(dim=tuple(range(1, err.ndim)))


def _rand_device(generator: torch.Generator | None, device) -> torch.device | str | None:
    return generator.device if generator is not None else device


def sample_timesteps(n: int, num_timesteps: int, kind: str = "uniform", mean: float = 0.0, std: float = 1.0,
                     device=None, generator: torch.Generator | None = None) -> Tensor:
    """Training timesteps: uniform over [0, T) or logit-normal (SD3: t/T = sigmoid(N(mean, std))), discretised."""
    dev = _rand_device(generator, device)
    if kind == "uniform":
        t = torch.randint(0, num_timesteps, (n,), generator=generator, device=dev)
    elif kind == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator, device=dev, dtype=torch.float64) * std + mean)
        t = (u * num_timesteps).long().clamp(0, num_timesteps - 1)
    else:
        raise ValueError(f"unknown timestep sampling '{kind}': choose one of {TIMESTEP_SAMPLING}")
    return t.to(device) if device is not None else t


def offset_noise_like(x: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise plus ``strength`` times a per-sample, per-channel constant (offset noise, Guttenberg 2023)."""
    dev = _rand_device(generator, x.device)
    eps = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
    if strength > 0:
        shape = (x.shape[0], x.shape[1], *([1] * (x.ndim - 2)))
        eps = eps + strength * torch.randn(shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
    return eps


# ---- optional perceptual term ----

def _lpips_frames(x: Tensor) -> Tensor:
    """``prepare_lpips_frames`` (the one LPIPS frame preparation) with this term's configuration hint on bad input."""
    from difflab.metrics.lpips_metric import prepare_lpips_frames

    try:
        return prepare_lpips_frames(x)
    except (ValueError, TypeError) as err:
        raise ValueError(f"objective.lpips_weight > 0: {err}; set objective.lpips_weight=0 for latent models") from err


class PerceptualTerm:
    """LPIPS between predicted and true x0, built lazily from a local backbone file and held in ``Frozen``.

    ``Frozen`` keeps the network out of the owner's state_dict, optimizer and EMA copy. When the backbone file is
    missing the term is disabled with one warning (per process and path). Gradients flow into the prediction.
    """

    def __init__(self, net: str = "alex", backbone: str | os.PathLike | None = None):
        self.net, self.backbone = net, backbone
        self._holder: Frozen | None = None
        self._state = "unbuilt"

    def _build(self) -> None:
        from difflab.metrics.common import warn_once
        from difflab.metrics.lpips_metric import BACKBONE_FILES, build_lpips, default_backbone_path

        if self.net not in BACKBONE_FILES:
            raise ValueError(f"objective.lpips_net must be one of {sorted(BACKBONE_FILES)}, got {self.net!r}")
        path = Path(self.backbone) if self.backbone else default_backbone_path(self.net)
        if not path.is_file():
            filename, url = BACKBONE_FILES[self.net]
            warn_once(f"objective-lpips-missing:{path}",
                      f"LPIPS loss term disabled: {self.net} backbone weights not found at {path}; download {filename} "
                      f"from {url} and set objective.lpips_backbone=<path> (or objective.lpips_weight=0)")
            self._state = "disabled"
            return
        self._holder = Frozen(build_lpips(self.net, backbone_weights=path))
        self._state = "built"

    @property
    def enabled(self) -> bool:
        if self._state == "unbuilt":
            self._build()
        return self._state == "built"

    def __call__(self, x0_hat: Tensor, x0: Tensor) -> Tensor | None:
        """Per-sample LPIPS (videos: mean over frames), or None when disabled."""
        if not self.enabled:
            return None
        model = self._holder.module
        if self._holder.device != x0.device:
            self._holder.to(x0.device)
        a, b = _lpips_frames(x0_hat), _lpips_frames(x0)
        d = model(a, b).flatten()
        return d.view(x0.shape[0], -1).mean(dim=1)


class Objective:
    """The training objective: prediction target, loss, weighting, timestep sampling, noise and x0-clipping options.

    ``x0_clip`` (none / static / dynamic) is applied only when sampling (``self.x0_clip`` is an ``X0Clip``).
    ``lpips_weight > 0`` adds ``lpips_weight * LPIPS(x0_hat, x0)`` per sample to the loss.
    """

    def __init__(self, prediction: str = "eps", loss: str = "mse", weighting: str = "uniform",
                 min_snr_gamma: float = 5.0, snr_min: float = 0.1, snr_max: float = 10.0, huber_delta: float = 1.0,
                 timestep_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 offset_noise: float = 0.0, x0_clip: str | None = "static", clip_range: float = 1.0,
                 dynamic_quantile: float = 0.995, dynamic_max: float | None = None, lpips_weight: float = 0.0,
                 lpips_net: str = "alex", lpips_backbone: str | None = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"objective.prediction='{prediction}' is unknown: choose one of {PREDICTIONS}")
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"objective.weighting='{weighting}' is unknown: choose one of {sorted(LOSS_WEIGHTINGS)}")
        if loss not in LOSSES:
            raise ValueError(f"objective.loss='{loss}' is unknown: choose one of {LOSSES}")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"objective.timestep_sampling='{timestep_sampling}' is unknown: choose one of "
                             f"{TIMESTEP_SAMPLING}")
        if min_snr_gamma <= 0 or not 0 < snr_min <= snr_max:
            raise ValueError(f"need objective.min_snr_gamma > 0 and 0 < snr_min <= snr_max; got {min_snr_gamma}, "
                             f"{snr_min}, {snr_max}")
        if lpips_weight < 0:
            raise ValueError(f"objective.lpips_weight must be >= 0, got {lpips_weight}")
        self.prediction, self.loss, self.weighting = prediction, loss, weighting
        self.weight_kwargs = dict(gamma=min_snr_gamma, snr_min=snr_min, snr_max=snr_max)
        self.huber_delta = huber_delta
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, logit_mean, logit_std
        self.offset_noise = offset_noise
        self.x0_clip = X0Clip(x0_clip or "none", clip_range, dynamic_quantile, dynamic_max)
        self.lpips_weight = float(lpips_weight)
        self.perceptual = PerceptualTerm(lpips_net, lpips_backbone) if self.lpips_weight > 0 else None
        self._warned_eps_zero_snr = False

    def weight(self, snr: Tensor) -> Tensor:
        """Per-sample loss weight at the given SNRs."""
        return LOSS_WEIGHTINGS[self.weighting](snr, self.prediction, **self.weight_kwargs)

    def _check_schedule(self, schedule) -> None:
        if self.prediction == "eps" and schedule.zero_terminal_snr and not self._warned_eps_zero_snr:
            import warnings

            self._warned_eps_zero_snr = True
            warnings.warn("eps-prediction with zero terminal SNR: x0 cannot be recovered at the last timestep "
                          "(Lin et al. 2024); use objective=v or objective=x0", UserWarning, stacklevel=3)

    def losses(self, net: Callable[[Tensor, Tensor], Tensor], x0: Tensor, schedule, t: Tensor | None = None,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Noise x0 at timesteps t (sampled if None), run ``net(x_t, t)`` and return per-sample losses.

        Returns dict(loss=weighted per-sample loss (+ LPIPS term), raw=unweighted diffusion loss, t=timesteps,
        x0_hat=predicted x0, and lpips=per-sample LPIPS when that term is active).
        """
        self._check_schedule(schedule)
        n = x0.shape[0]
        if t is None:
            t = sample_timesteps(n, schedule.num_timesteps, self.timestep_sampling, self.logit_mean, self.logit_std,
                                 device=x0.device, generator=generator)
        t = t.to(x0.device)
        eps = offset_noise_like(x0, self.offset_noise, generator)
        ab = schedule.alpha_bar(t, like=x0)
        x_t = add_noise(x0, eps, ab)
        out = net(x_t, t)
        target = training_target(x0, eps, ab, self.prediction)
        raw = elementwise_loss(out.float(), target.float(), self.loss, self.huber_delta)
        snr = schedule.snr.to(x0.device)[t].float()
        loss = raw * self.weight(snr)
        x0_hat, _ = predictions_from_output(out.float(), x_t.float(), ab.float(), self.prediction)
        result = {"loss": loss, "raw": raw, "t": t, "x0_hat": x0_hat}
        if self.perceptual is not None:
            lp = self.perceptual(x0_hat, x0)
            if lp is not None:
                result["lpips"] = lp
                result["loss"] = loss + self.lpips_weight * lp
        return result


def timestep_buckets(t: Tensor, num_timesteps: int, num_buckets: int = 10) -> Tensor:
    """Bucket index in [0, num_buckets) for each training timestep (equal-width buckets over [0, T))."""
    return (t.long() * num_buckets // num_timesteps).clamp(0, num_buckets - 1)
