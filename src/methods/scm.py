"""Continuous-time consistency models (sCM, Lu & Song 2024, arXiv 2410.11081): the consistency condition df/dt = 0
along the probability-flow ODE, trained through one forward-mode derivative of the network per step, with sCM's
tangent warmup, tangent normalisation and adaptive weighting; from a guided teacher (sCD) or from the data alone (sCT).
Sampled in one or a few steps with ``sampler=consistency``."""

from __future__ import annotations

import logging
from typing import Any, Sequence, cast

import torch

from difflab.diffusion.consistency import (
    normalize_tangent,
    scm_loss,
    scm_tangent,
    time_derivative,
    time_input_slope,
    trigflow_point,
    trigflow_time,
    trigflow_velocity,
)
from difflab.diffusion.guidance import Guidance
from difflab.diffusion.objectives import NoiseLevelWeighting
from difflab.methods.consistency import ConsistencyTraining, same_randomness
from difflab.methods.guidance_input import GuidanceScales
from difflab.utils.errors import ConfigError
from difflab.utils.frozen import Frozen

Tensor = torch.Tensor
log = logging.getLogger(__name__)
STEEP_TIME_INPUT = 10.0  # |d net_time / dt| above this: warn (sCM's c_noise(t) = t has 1; flow's default 1000 t ~1600)


class ContinuousConsistency(ConsistencyTraining):
    """sCM in TrigFlow's coordinates on any continuous process: x = cos(t) x0 + sin(t) sigma_d eps with
    sigma_d tan(t) ~ lognormal(``p_mean``, ``p_std``); the network's F (``trigflow_output``) is pulled towards
    F- + g, g the normalised tangent (``tangent_c``) whose JVP term ramps in over ``warmup_steps``. dx/dt is the
    guided teacher's velocity with ``teacher_ckpt`` (sCD: the student starts as the teacher), else the path's own
    (sCT: ``init_from`` a diffusion checkpoint tunes it). ``adaptive_weighting`` learns sCM's w(t)."""

    name = "scm"
    fixed_on_resume = ("warmup_steps", "adaptive_weighting")  # the tangent ramp follows the step; a weighting, state

    def __init__(
        self,
        teacher_ckpt: str | None = None,
        p_mean: float = -1.0,
        p_std: float = 1.4,
        tangent_c: float = 0.1,
        warmup_steps: int = 500,
        adaptive_weighting: bool = True,
        teacher_guidance: Guidance | None = None,
        time_groups: int = 8,
        guidance_scales: Sequence[float] | None = None,
    ) -> None:
        super().__init__(
            teacher_ckpt,
            p_mean,
            p_std,
            teacher_guidance=teacher_guidance,
            time_groups=time_groups,
            double_every=1,
            guidance_scales=guidance_scales,
        )
        if tangent_c <= 0 or warmup_steps < 0:
            raise ConfigError(
                f"method=scm needs tangent_c > 0 and warmup_steps >= 0; got tangent_c={tangent_c}, "
                f"warmup_steps={warmup_steps}"
            )
        self.tangent_c, self.warmup_steps = float(tangent_c), int(warmup_steps)
        self.weighting = NoiseLevelWeighting() if adaptive_weighting else None
        self.warmup = 1.0

    def describe(self) -> str:
        source = f"distilled from {self.teacher_ckpt} (sCD)" if self.teacher_ckpt else "from this run's weights (sCT)"
        if self.guidance_scales is not None:
            source += f", guided {self.guidance_scales.describe()}"
        weighting = "adaptive weighting" if self.weighting is not None else "unweighted"
        return f"continuous-time consistency, {source}, tangent warmup {self.warmup_steps} steps, {weighting}"

    def setup(self, module: Any, stage: str) -> None:
        super().setup(module, stage)
        if stage == "fit":
            self.warn_if_steep(module.diffusion)

    def warn_if_steep(self, diffusion: Any) -> float:
        """Log a warning when the denoiser's time input is steep in TrigFlow time (``time_input_slope``): the JVP's
        time term grows with it, and on digits sCM diverged at flow's default 1000 t but trained at 1 t (BENCHMARKS.md
        section 16d). Returns the slope."""
        slope = time_input_slope(diffusion.process, float(diffusion.objective.sigma_data), self.p_mean, self.p_std)
        if slope > STEEP_TIME_INPUT:
            log.warning(
                "method=scm: the denoiser's time input moves %.0f units per unit of TrigFlow time (process.time_scale="
                "%s); sCM's derivative goes through it and diverged on digits at this scale: train the teacher (or the "
                "init_from run) and this run with process.time_scale=1 (experiment=digits_scm does)",
                slope,
                f"{getattr(diffusion.process, 'time_scale', float('nan')):g}",
            )
        return slope

    def on_train_batch_start(self, module: Any, step: int) -> None:
        self.warmup = min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0  # a function of the step
        module.log("method/tangent_warmup", self.warmup, prog_bar=False)

    # ---------------------------------------------------------------- the loss
    @staticmethod
    def process_point(diffusion: Any, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The process's (x, time) at TrigFlow's (x, t): the same noise level, x rescaled by alpha / cos t."""
        sigma_data = diffusion.objective.sigma_data
        time = diffusion.process.time_from_log_snr(-2 * torch.log(sigma_data * torch.tan(t)))
        alpha, _ = diffusion.process.coefficients_like(time, x)
        return x * (alpha / torch.cos(t).to(x.dtype).reshape(alpha.shape)), time

    @classmethod
    def trigflow_output(cls, diffusion: Any, net: Any, x: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        """F(x, t): the denoiser's unguided prediction as TrigFlow's velocity over sigma_d (any process, any target);
        differentiable in x and t, forward mode included."""
        x_p, time = cls.process_point(diffusion, x, t)
        x0, eps = diffusion.x0_eps_estimate(net, x_p, time, cond)
        sigma_data = diffusion.objective.sigma_data
        return trigflow_velocity(x0, eps, t, sigma_data) / sigma_data

    def teacher_velocity(self, x: Tensor, raw: Any, t: Tensor, scales: Tensor | None = None) -> Tensor:
        """The guided teacher's dx/dt at TrigFlow's (x, t) (at each sample's ``scales`` when given); one guided call
        per distinct t."""
        teacher: Any = cast(Frozen, self._teacher).module
        d = teacher.diffusion
        x_p, time = self.process_point(d, x, t)
        x0, eps = self.teacher_predictions(x_p, raw, time, scales)
        return trigflow_velocity(x0, eps, t, d.objective.sigma_data)

    def loss(self, module: Any, batch: dict[str, Any]) -> Tensor:
        d = module.diffusion
        x0 = batch["x"]
        raw = d.batch_condition(batch)
        if self._teacher is None:  # sCT: conditions dropped like diffusion training, so CFG still works
            raw = d.conditioner.drop(raw, d.p_uncond)
        sigma = self.noise_levels(x0.shape[0]).to(x0.device)
        sigma_data = d.objective.sigma_data
        t = trigflow_time(sigma, sigma_data)
        eps = torch.randn_like(x0)
        scales = self.draw_scales(x0)
        cond = GuidanceScales.into(d.condition(raw), scales)
        x = trigflow_point(x0, eps, t, sigma_data)
        if self._teacher is not None:
            dx_dt = self.teacher_velocity(x, raw, t, scales)
        else:
            dx_dt = trigflow_velocity(x0, eps, t, sigma_data)
        F = lambda x, t: self.trigflow_output(d, module, x, t, cond)  # noqa: E731
        with torch.no_grad(), same_randomness(x0.device):
            F_minus, dF_dt = time_derivative(F, x, t, dx_dt)
        F_theta = F(x, t)
        g = scm_tangent(F_minus.float(), dF_dt.float(), x, dx_dt, t, sigma_data, self.warmup)
        g = normalize_tangent(g, self.tangent_c)
        return scm_loss(F_theta, F_minus.float(), g, self.learned_logvar(sigma)).mean()
