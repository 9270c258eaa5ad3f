"""Prediction targets, their conversions, loss weightings and the training objective, for any noise process.

Everything here is written against the affine path x_t = alpha x0 + sigma eps of a process
(``difflab.diffusion.processes``): ``alpha`` and ``sigma`` are broadcast to the data shape. Every sampler and the
training loss convert model outputs through ``predictions_from_output``, so the target algebra lives in one place.

Targets: ``eps``; ``x0``; ``v`` = (alpha eps - sigma x0) / r with r = sqrt(alpha^2 + sigma^2) (Salimans & Ho's v on
VP paths, where r = 1); ``flow`` = dx_t/dt = alpha' x0 + sigma' eps (the velocity eps - x0 on the linear path);
``edm`` = EDM's F (Karras et al. 2022) under the preconditioning D = c_skip z + c_out F(c_in z), z = x_t / alpha,
s = sigma / alpha, c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
sd = sigma_data. The network's input is x_t times ``input_scale`` (c_in / alpha for ``edm``, else 1).

Loss weightings are functions of log-SNR, applied in the units of the target's own loss. With x_t fixed, every
target's error is a multiple of the x0 error, |target err|^2 = k |x0 err|^2 with k = snr (eps), snr + 1 (v),
1 / c_out^2 (edm), (alpha' - sigma' alpha / sigma)^2 (flow; 1 / sigma^2 on the linear path), 1 (x0). A weighting is
stated once in eps units and converted by snr / k (``eps_to_target_units``), which is why min-SNR-gamma takes a
different form per target (Hang et al. 2023).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

from difflab.diffusion.processes import NoiseProcess, rng_device
from difflab.utils.frozen import Frozen

Tensor = torch.Tensor
PREDICTIONS = ("eps", "x0", "v", "flow", "edm")
LOSSES = ("mse", "l1", "huber")
CLIP_MODES = ("none", "static", "dynamic")
# eps -> x0 divides by alpha; at zero terminal SNR (alpha = 0) x0 is not identifiable from an eps prediction, so
# the division uses sqrt of this alpha-bar floor (fp16's smallest subnormal, the value diffusers uses there).
ALPHA_BAR_FLOOR = 2.0**-24


def add_noise(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x_t = alpha x0 + sigma eps."""
    return alpha * x0 + sigma * eps


def edm_coefficients(alpha: Tensor, sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor]:
    """EDM's (c_skip, c_out, c_in) at noise level s = sigma / alpha (acting on z = x_t / alpha), written with
    denominators sigma^2 + alpha^2 sd^2 so they stay finite at alpha = 0 (zero terminal SNR)."""
    d2 = sigma**2 + (alpha * sigma_data) ** 2
    return (alpha * sigma_data) ** 2 / d2, sigma * sigma_data / d2.sqrt(), alpha / d2.sqrt()


def input_scale(alpha: Tensor, sigma: Tensor, prediction: str, sigma_data: float = 0.5) -> Tensor | float:
    """What x_t is multiplied by before the network sees it: EDM's c_in / alpha for ``edm``, else 1."""
    if prediction == "edm":
        return 1 / (sigma**2 + (alpha * sigma_data) ** 2).sqrt()
    return 1.0


def _edm_skip(alpha: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """c_skip / alpha: the skip connection's factor on x_t itself."""
    return alpha * sigma_data**2 / (sigma**2 + (alpha * sigma_data) ** 2)


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction '{prediction}': choose one of {PREDICTIONS}")


def training_target(
    x0: Tensor,
    eps: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    prediction: str,
    dalpha: Tensor | None = None,
    dsigma: Tensor | None = None,
    sigma_data: float = 0.5,
) -> Tensor:
    """What the network regresses for (x0, eps) at (alpha, sigma); also the output a ``prediction``-type network
    gives for that pair (the inverse of ``predictions_from_output``). ``flow`` needs the path's derivatives."""
    _check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        r = (alpha**2 + sigma**2).sqrt()
        return (alpha * eps - sigma * x0) / r
    if prediction == "flow":
        if dalpha is None or dsigma is None:
            raise ValueError("prediction 'flow' needs the process's time derivatives (a continuous process)")
        return dalpha * x0 + dsigma * eps
    _, c_out, _ = edm_coefficients(alpha, sigma, sigma_data)
    x_t = alpha * x0 + sigma * eps
    return (x0 - _edm_skip(alpha, sigma, sigma_data) * x_t) / c_out


def predictions_from_output(
    out: Tensor,
    x_t: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    prediction: str,
    dalpha: Tensor | None = None,
    dsigma: Tensor | None = None,
    sigma_data: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from a network output of the given prediction type, consistent with x_t.

    Finite at both ends: eps-prediction at alpha = 0 exactly (zero terminal SNR, where x0 is not identifiable from
    eps) divides by sqrt(ALPHA_BAR_FLOOR) instead of 0.
    """
    _check_prediction(prediction)
    if prediction == "eps":
        safe = torch.where(alpha > 0, alpha, torch.full_like(alpha, ALPHA_BAR_FLOOR**0.5))
        return (x_t - sigma * out) / safe, out
    if prediction == "x0":
        return out, (x_t - alpha * out) / sigma
    if prediction == "v":
        r = (alpha**2 + sigma**2).sqrt()
        a, s, x = alpha / r, sigma / r, x_t / r
        return a * x - s * out, s * x + a * out
    if prediction == "flow":
        if dalpha is None or dsigma is None:
            raise ValueError("prediction 'flow' needs the process's time derivatives (a continuous process)")
        det = alpha * dsigma - sigma * dalpha  # solve [alpha sigma; alpha' sigma'] [x0; eps] = [x_t; out]
        return (dsigma * x_t - sigma * out) / det, (alpha * out - dalpha * x_t) / det
    _, c_out, _ = edm_coefficients(alpha, sigma, sigma_data)
    x0 = _edm_skip(alpha, sigma, sigma_data) * x_t + c_out * out
    return x0, (x_t - alpha * x0) / sigma


def eps_to_target_units(
    alpha: Tensor,
    sigma: Tensor,
    prediction: str,
    dalpha: Tensor | None = None,
    dsigma: Tensor | None = None,
    sigma_data: float = 0.5,
) -> Tensor:
    """|eps err|^2 / |target err|^2 at fixed x_t (= snr / k, see the module docstring): converts a loss weighting
    stated in eps units into the target's units. Finite everywhere a process reaches (1 for eps, 0 for v at snr 0)."""
    _check_prediction(prediction)
    snr = (alpha / sigma) ** 2
    if prediction == "eps":
        return torch.ones_like(snr)
    if prediction == "x0":
        return snr
    if prediction == "v":
        return snr / (snr + 1)
    if prediction == "flow":
        # flow: the caller passes the path's derivatives (training_target refuses the target without them)
        return (alpha / sigma) ** 2 / (dalpha - dsigma * alpha / sigma) ** 2  # type: ignore[operator]
    return (alpha * sigma_data) ** 2 / (sigma**2 + (alpha * sigma_data) ** 2)  # snr c_out^2


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """The noise consistent with x_t and a (possibly clipped) x0: (x_t - alpha x0) / sigma."""
    return (x_t - alpha * x0) / sigma


def _abs_quantile(x: Tensor, q: float) -> Tensor:
    """Per-sample q-quantile of |x| over all non-batch dims (torch.quantile; kth value for very large samples)."""
    flat = x.detach().abs().reshape(x.shape[0], -1).float()
    if flat.shape[1] <= 2**24:
        return torch.quantile(flat, q, dim=1)
    k = max(1, min(flat.shape[1], math.ceil(q * flat.shape[1])))
    return flat.kthvalue(k, dim=1).values


def clip_x0(
    x0: Tensor,
    mode: str | None = "static",
    clip_range: float = 1.0,
    dynamic_quantile: float = 0.995,
    dynamic_max: float | None = None,
) -> Tensor:
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

    def __post_init__(self) -> None:
        if self.mode not in CLIP_MODES:
            raise ValueError(f"objective.x0_clip='{self.mode}' is unknown: choose one of {CLIP_MODES}")

    def __call__(self, x0: Tensor) -> Tensor:
        return clip_x0(x0, self.mode, self.clip_range, self.dynamic_quantile, self.dynamic_max)

    def __str__(self) -> str:
        return self.mode


# ---- loss weightings: functions of log-SNR (per sample) ----
# Each returns (weight, units): "eps" weights are converted to the target's units by ``eps_to_target_units``,
# "target" weights apply as they are.


def uniform_weight(log_snr: Tensor, **_: float) -> tuple[Tensor, str]:
    """Every noise level weighs the same in the chosen target's own units."""
    return torch.ones_like(log_snr), "target"


def min_snr_weight(log_snr: Tensor, gamma: float = 5.0, **_: float) -> tuple[Tensor, str]:
    """Min-SNR-gamma (Hang et al. 2023): x0-units weight min(snr, gamma), i.e. gamma / max(snr, gamma) in eps units
    (eps: min(snr, g) / snr, v: min(snr, g) / (snr + 1)); exactly 1 in eps units at zero terminal SNR."""
    return gamma / log_snr.exp().clamp(min=gamma), "eps"


def inv_snr_clamped_weight(
    log_snr: Tensor, snr_min: float = 0.1, snr_max: float = 10.0, **_: float
) -> tuple[Tensor, str]:
    """The research log's hand-made weighting 1 / clamp(snr, snr_min, snr_max), the same for every target."""
    return 1.0 / log_snr.exp().clamp(min=snr_min, max=snr_max), "target"


def edm_weight(log_snr: Tensor, sigma_data: float = 0.5, **_: float) -> tuple[Tensor, str]:
    """EDM's lambda(s) = (s^2 + sd^2) / (s sd)^2 on x0 errors (s^2 = 1 / snr), i.e. (1 + sd^2 snr) / sd^2 ... in eps
    units lambda / snr; with the ``edm`` target it is exactly 1 (Karras et al. 2022, Table 1)."""
    snr = log_snr.exp()
    return (1 + sigma_data**2 * snr) / (sigma_data**2 * snr), "eps"


LOSS_WEIGHTINGS: dict[str, Callable[..., tuple[Tensor, str]]] = {
    "uniform": uniform_weight,
    "min_snr": min_snr_weight,
    "inv_snr_clamped": inv_snr_clamped_weight,
    "edm": edm_weight,
}


def uncertainty_weighted(loss: Tensor, logvar: Tensor | float) -> Tensor:
    """EDM2's learned-uncertainty form of a per-sample loss, loss e^(-logvar) + logvar (Karras et al. 2024):
    minimised by logvar = ln E[loss | noise level], so every level's gradient is normalised by its own loss."""
    return loss * torch.exp(-torch.as_tensor(logvar)) + logvar


SIGMA_RANGE = (1e-20, 1e20)  # the weighting's input is clamped to it: zero terminal SNR (sigma = inf) stays finite


class NoiseLevelWeighting(nn.Module):
    """The learned log-variance u(sigma) of EDM2's loss weighting (sCM's adaptive weighting, ``method.
    adaptive_weighting`` of diffusion training): fixed random Fourier features of ln(sigma) / 4, then a zero-initialised
    linear layer (u = 0 at the start: the plain loss)."""

    def __init__(self, features: int = 128, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(features, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(features, generator=g))
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    freqs: Tensor
    phases: Tensor

    def forward(self, sigma: Tensor) -> Tensor:
        c_noise = (sigma.double().clamp(SIGMA_RANGE[0], SIGMA_RANGE[1]).log() / 4).float().reshape(-1, 1)
        out: Tensor = self.linear(math.sqrt(2) * torch.cos(c_noise * self.freqs + self.phases))
        return out.reshape(-1)


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


def offset_noise_like(x: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise plus ``strength`` times a per-sample, per-channel constant (offset noise, Guttenberg 2023)."""
    dev = rng_device(generator, x.device)
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

    def __init__(self, net: str = "alex", backbone: str | os.PathLike[str] | None = None) -> None:
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
            warn_once(
                f"objective-lpips-missing:{path}",
                f"LPIPS loss term disabled: {self.net} backbone weights not found at {path}; download {filename} "
                f"from {url} and set objective.lpips_backbone=<path> (or objective.lpips_weight=0)",
            )
            self._state = "disabled"
            return
        # the backbone file exists (checked above), so build_lpips returns the network, not None
        self._holder = Frozen(cast(torch.nn.Module, build_lpips(self.net, backbone_weights=path)))
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
        holder = cast(Frozen, self._holder)  # enabled: _build set it
        model = holder.module
        if holder.device != x0.device:
            holder.to(x0.device)
        a, b = _lpips_frames(x0_hat), _lpips_frames(x0)
        d: Tensor = model(a, b).flatten()
        return d.view(x0.shape[0], -1).mean(dim=1)


class Objective:
    """The training objective: prediction target, loss, weighting, noise and x0-clipping options, on any process.

    The process (``difflab.diffusion.processes``) supplies times, path coefficients and the denoiser's time input;
    this class turns a clean batch into per-sample losses. ``sigma_data`` is EDM's (the ``edm`` target's
    preconditioning and the ``edm`` weighting). ``x0_clip`` (none / static / dynamic) is applied only when sampling
    (``self.x0_clip`` is an ``X0Clip``). ``lpips_weight > 0`` adds ``lpips_weight * LPIPS(x0_hat, x0)`` per sample.
    ``timestep_sampling`` / ``logit_mean`` / ``logit_std`` are read from configs saved before the training density
    moved to the process (``schedule.density`` for vp) and only warn when not uniform.
    """

    def __init__(
        self,
        prediction: str = "eps",
        loss: str = "mse",
        weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        snr_min: float = 0.1,
        snr_max: float = 10.0,
        huber_delta: float = 1.0,
        sigma_data: float = 0.5,
        offset_noise: float = 0.0,
        x0_clip: str | None = "static",
        clip_range: float = 1.0,
        dynamic_quantile: float = 0.995,
        dynamic_max: float | None = None,
        lpips_weight: float = 0.0,
        lpips_net: str = "alex",
        lpips_backbone: str | None = None,
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"objective.prediction='{prediction}' is unknown: choose one of {PREDICTIONS}")
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"objective.weighting='{weighting}' is unknown: choose one of {sorted(LOSS_WEIGHTINGS)}")
        if loss not in LOSSES:
            raise ValueError(f"objective.loss='{loss}' is unknown: choose one of {LOSSES}")
        if min_snr_gamma <= 0 or not 0 < snr_min <= snr_max or sigma_data <= 0:
            raise ValueError(
                f"need objective.min_snr_gamma > 0, 0 < snr_min <= snr_max and sigma_data > 0; got "
                f"{min_snr_gamma}, {snr_min}, {snr_max}, {sigma_data}"
            )
        if lpips_weight < 0:
            raise ValueError(f"objective.lpips_weight must be >= 0, got {lpips_weight}")
        if timestep_sampling != "uniform":
            import warnings

            warnings.warn(
                f"objective.timestep_sampling={timestep_sampling} is ignored: the training density belongs "
                f"to the process now (schedule.density=logit_normal for vp)",
                UserWarning,
                stacklevel=2,
            )
        self.prediction, self.loss, self.weighting = prediction, loss, weighting
        self.sigma_data = float(sigma_data)
        self.weight_kwargs = dict(gamma=min_snr_gamma, snr_min=snr_min, snr_max=snr_max, sigma_data=self.sigma_data)
        self.huber_delta = huber_delta
        self.offset_noise = offset_noise
        self.x0_clip = X0Clip(x0_clip or "none", clip_range, dynamic_quantile, dynamic_max)
        self.lpips_weight = float(lpips_weight)
        self.perceptual = PerceptualTerm(lpips_net, lpips_backbone) if self.lpips_weight > 0 else None
        self._warned_eps_zero_snr = False

    def check_process(self, process: NoiseProcess) -> None:
        """Fail early on a target the process cannot express; warn where it is ill-posed (eps at zero SNR)."""
        if self.prediction == "flow" and not process.continuous:
            raise ValueError(
                f"objective.prediction=flow needs a continuous process (edm or flow: the velocity is "
                f"d x_t / dt); process {process.name} is discrete: use eps, x0, v or edm"
            )
        if self.prediction == "eps" and process.reaches_pure_noise and not self._warned_eps_zero_snr:
            import warnings

            self._warned_eps_zero_snr = True
            warnings.warn(
                f"eps-prediction on a path that reaches zero terminal SNR ({process.name}: alpha = 0 at the "
                f"noise end): x0 cannot be recovered there (Lin et al. 2024); use objective=v or x0, or "
                f"the process's own target",
                UserWarning,
                stacklevel=3,
            )

    def path_at(self, process: NoiseProcess, t: Tensor, like: Tensor) -> dict[str, Tensor]:
        """alpha, sigma (and d/dt for the flow target) at times t, broadcast against ``like``."""
        alpha, sigma = process.coefficients_like(t, like)
        path = {"alpha": alpha, "sigma": sigma}
        if self.prediction == "flow":
            da, ds = process.derivatives(torch.as_tensor(t, dtype=torch.float64, device=like.device))
            shape = (-1, *([1] * (like.ndim - 1)))
            path.update(dalpha=da.to(alpha.dtype).reshape(shape), dsigma=ds.to(alpha.dtype).reshape(shape))
        return path

    def input_scale(self, alpha: Tensor, sigma: Tensor) -> Tensor | float:
        """The factor applied to x_t before the network (EDM's c_in / alpha for the edm target)."""
        return input_scale(alpha, sigma, self.prediction, self.sigma_data)

    def to_x0_eps(self, out: Tensor, x_t: Tensor, path: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from the network output at a path point (see ``predictions_from_output``)."""
        return predictions_from_output(
            out,
            x_t,
            path["alpha"],
            path["sigma"],
            self.prediction,
            path.get("dalpha"),
            path.get("dsigma"),
            self.sigma_data,
        )

    def weight(self, log_snr: Tensor, path: dict[str, Tensor]) -> Tensor:
        """Per-sample loss weight in the target's units at the given log-SNRs."""
        w, units = LOSS_WEIGHTINGS[self.weighting](log_snr, **self.weight_kwargs)
        if units == "eps":
            flat = {k: v.flatten() for k, v in path.items()}
            w = w * eps_to_target_units(
                flat["alpha"].double(),
                flat["sigma"].double(),
                self.prediction,
                _double(flat.get("dalpha")),
                _double(flat.get("dsigma")),
                self.sigma_data,
            )
        return w.float()

    def losses(
        self,
        net: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        process: NoiseProcess,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
        eps: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Noise x0 at process times t (drawn from the process's density if None) with ``eps`` (fresh noise if None; a
        coupling's paired noise in reflow), run ``net(x_in, net_time)`` and return per-sample losses.

        Returns dict(loss=weighted per-sample loss (+ LPIPS term), raw=unweighted diffusion loss, t=process times,
        log_snr=their log-SNR, x0_hat=predicted x0, and lpips=per-sample LPIPS when that term is active).
        """
        self.check_process(process)
        if t is None:
            t = process.sample_times(x0.shape[0], device=x0.device, generator=generator)
        t = torch.as_tensor(t, device=x0.device)
        if eps is None:
            eps = offset_noise_like(x0, self.offset_noise, generator)
        elif eps.shape != x0.shape:
            raise ValueError(f"paired noise of shape {tuple(eps.shape)} for data of shape {tuple(x0.shape)}")
        path = self.path_at(process, t, x0)
        x_t = add_noise(x0, eps, path["alpha"], path["sigma"])
        out = net(x_t * self.input_scale(path["alpha"], path["sigma"]), process.net_time(t).to(x0.device))
        target = training_target(
            x0,
            eps,
            path["alpha"],
            path["sigma"],
            self.prediction,
            path.get("dalpha"),
            path.get("dsigma"),
            self.sigma_data,
        )
        raw = elementwise_loss(out.float(), target.float(), self.loss, self.huber_delta)
        log_snr = process.log_snr_at(t.double()).to(x0.device)
        loss = raw * self.weight(log_snr, path)
        path32 = {k: v.float() for k, v in path.items()}
        x0_hat, _ = self.to_x0_eps(out.float(), x_t.float(), path32)
        result = {"loss": loss, "raw": raw, "t": t, "log_snr": log_snr, "x0_hat": x0_hat}
        if self.perceptual is not None:
            lp = self.perceptual(x0_hat, x0)
            if lp is not None:
                result["lpips"] = lp
                result["loss"] = loss + self.lpips_weight * lp
        return result


def _double(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.double()


# Per-noise-level loss curves are bucketed on log-SNR so that they compare across processes: equal-width buckets
# over [-10, 10] (the ends collect everything beyond), bucket 0 the least noisy.
LOG_SNR_BUCKET_RANGE = (-10.0, 10.0)


def log_snr_buckets(
    log_snr: Tensor, num_buckets: int = 10, bounds: tuple[float, float] = LOG_SNR_BUCKET_RANGE
) -> Tensor:
    """Bucket index in [0, num_buckets) for each log-SNR: bucket 0 = log-SNR near the top of ``bounds`` (clean)."""
    lo, hi = bounds
    frac = ((hi - log_snr.double()) / (hi - lo)).clamp(0, 1)  # +-inf log-SNR land in the end buckets
    return (frac * num_buckets).floor().long().clamp(0, num_buckets - 1)


def bucket_edges(
    num_buckets: int = 10, bounds: tuple[float, float] = LOG_SNR_BUCKET_RANGE
) -> list[tuple[float, float]]:
    """(high, low) log-SNR edges of each bucket, in bucket order (for plot labels)."""
    lo, hi = bounds
    width = (hi - lo) / num_buckets
    return [(hi - i * width, hi - (i + 1) * width) for i in range(num_buckets)]
