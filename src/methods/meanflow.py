"""MeanFlow (Geng et al. 2025, arXiv 2505.13447): a flow model of average velocities u(z, r, t), trained from scratch
with the MeanFlow identity through one forward-mode derivative per step, sampled in one step with
``sampler=meanflow``."""

from __future__ import annotations

from typing import Any

import torch

from difflab.diffusion.consistency import time_derivative
from difflab.diffusion.guidance import Guidance, concat_cond, guidance_active_per_sample
from difflab.diffusion.meanflow import adaptive_l2, guided_velocity, meanflow_target, meanflow_times
from difflab.diffusion.processes import FlowProcess
from difflab.diffusion.samplers import Sampler, sampler_name
from difflab.methods.base import TrainingMethod
from difflab.utils.errors import ConfigError


class MeanFlowTraining(TrainingMethod):
    """The denoiser (built with ``model.net.interval_input=true``: it embeds t - r beside t) predicts the average
    velocity over [r, t] and regresses on the stopped-gradient target v - (t - r) du/dt, du/dt its own derivative
    along the conditional path at fixed r. (t, r) are logit-normal(``p_mean``, ``p_std``), with r != t for a fraction
    ``ratio``; the squared error is weighted adaptively (``adaptive_p``, ``adaptive_c``). Conditions are dropped with
    the diffusion's ``p_uncond``. ``target_guidance`` (classifier-free guidance: its scale, interval and per-class
    scales) is baked into the conditional targets as MeanFlow's guided velocity with mixing ``kappa``, from the
    network's own velocities, so one unguided step samples guided; None, or a sample's scale of 1: plain targets.
    Flow process, velocity target."""

    name = "meanflow"

    def __init__(
        self,
        ratio: float = 0.25,
        p_mean: float = -0.4,
        p_std: float = 1.0,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        target_guidance: Guidance | None = None,
        kappa: float = 0.5,
    ) -> None:
        if not 0 <= ratio <= 1 or p_std <= 0 or adaptive_p < 0 or adaptive_c <= 0 or not 0 <= kappa < 1:
            raise ConfigError(
                f"method=meanflow needs 0 <= ratio <= 1, p_std > 0, adaptive_p >= 0, adaptive_c > 0 and 0 <= kappa < 1;"
                f" got ratio={ratio}, p_std={p_std}, adaptive_p={adaptive_p}, adaptive_c={adaptive_c}, kappa={kappa}"
            )
        if target_guidance is not None and (target_guidance.method != "cfg" or target_guidance.rescale):
            raise ConfigError(
                f"method=meanflow bakes classifier-free guidance into its targets (guidance=cfg or cfg_interval, "
                f"guidance.rescale=0); got {target_guidance!r}: pick one of those, or method.target_guidance=null"
            )
        self.ratio, self.p_mean, self.p_std = float(ratio), float(p_mean), float(p_std)
        self.adaptive_p, self.adaptive_c = float(adaptive_p), float(adaptive_c)
        self.target_guidance, self.kappa = target_guidance, float(kappa)

    @property
    def guided(self) -> bool:
        """Whether the targets carry guidance (a CFG above scale 1, or per-class scales)."""
        g = self.target_guidance
        return g is not None and (float(g.scale) != 1.0 or bool(g.per_class))

    def check(self, process: Any, sampler: Sampler) -> None:
        """Refuse (ValueError) a process other than flow, or a student sampler other than ``meanflow``."""
        if not isinstance(process, FlowProcess):
            raise ValueError(f"method=meanflow trains on the flow process (process=flow), not {process.name}")
        name = sampler_name(sampler)
        if not name.startswith("meanflow"):
            raise ValueError(f"method=meanflow samples with sampler=meanflow (1 or a few steps), not {name}")

    def describe(self) -> str:
        guided = f", targets guided by {self.target_guidance!r} (kappa {self.kappa:g})" if self.guided else ""
        return (
            f"MeanFlow from scratch, r != t for {self.ratio:g} of the samples, adaptive weighting p={self.adaptive_p:g}"
            f"{guided}"
        )

    def setup(self, module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.refuse_misfit(module)
        d = module.diffusion
        if d.objective.prediction != "flow":
            raise ConfigError(
                f"method=meanflow regresses velocities: set objective.prediction=flow (got "
                f"{module.diffusion.objective.prediction})"
            )
        if self.guided and d.conditioner.batch_key is not None and d.p_uncond <= 0:
            raise ConfigError(
                f"method.target_guidance needs the unconditional velocity, which model.diffusion.p_uncond="
                f"{d.p_uncond} never trains: set p_uncond > 0 (0.1) or method.target_guidance=null"
            )
        if getattr(getattr(module.denoiser, "embed", None), "interval_mlp", None) is None:
            raise ConfigError(
                f"method=meanflow needs a denoiser with a second time input: model.net.interval_input=true "
                f"({type(module.denoiser).__name__} was built without it; every difflab denoiser has the option)"
            )

    def loss(self, module: Any, batch: dict[str, Any]) -> torch.Tensor:
        d = module.diffusion
        process = d.process
        x0 = batch["x"]
        raw = d.batch_condition(batch)
        dropped = d.conditioner.drop_mask(x0.shape[0], d.p_uncond if raw is not None else 0.0)
        cond = d.condition(raw if raw is None else d.conditioner.where_null(raw, dropped))
        t, r = (v.to(x0.device) for v in meanflow_times(x0.shape[0], self.ratio, self.p_mean, self.p_std))
        eps = torch.randn_like(x0)
        a_t, s_t = process.coefficients_like(t, x0)
        z = a_t * x0 + s_t * eps
        v = eps - x0
        if self.guided and raw is not None:
            v = self.guided_target_velocity(module, z, t, v, raw, cond, dropped)
        r_net = process.net_time(r).to(x0.device)

        def u(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t_net = process.net_time(t).to(z.device)
            return module(z, t_net, cond["vector"], cond["context"], cond["context_mask"], interval=t_net - r_net)

        u_theta, du_dt = time_derivative(u, z, t, v)  # one pass: its primal output carries the gradient
        target = meanflow_target(v, du_dt.detach().float(), t, r)
        return adaptive_l2(u_theta.float(), target, self.adaptive_p, self.adaptive_c).mean()

    def guided_target_velocity(
        self,
        module: Any,
        z: torch.Tensor,
        t: torch.Tensor,
        v: torch.Tensor,
        raw: Any,
        cond: dict[str, Any],
        dropped: torch.Tensor,
    ) -> torch.Tensor:
        """v replaced by MeanFlow's guided velocity where guidance applies: rows whose condition was kept, whose noise
        level lies in the guidance interval and whose scale is not 1. The network's own u(z, t, t) under ``cond`` (the
        batch's conditions) and the null condition, in one batched pass in eval mode without gradients, as the
        authors' code evaluates it."""
        d, g = module.diffusion, self.target_guidance
        assert g is not None
        scale = g.scales(raw, getattr(d.conditioner, "num_classes", None))
        active = guidance_active_per_sample(d.process.sigma_ve_at(t).cpu(), g.interval) & ~dropped.cpu()
        if isinstance(scale, torch.Tensor):
            active &= scale.cpu() != 1
        if not bool(active.any()):
            return v
        t_net = d.process.net_time(t).to(z.device)
        was_training = module.denoiser.training
        module.denoiser.eval()
        try:
            with torch.no_grad():
                both = concat_cond(cond, d.condition(d.null_condition(raw)))
                out = module(
                    torch.cat([z, z]),
                    torch.cat([t_net, t_net]),
                    both["vector"],
                    both["context"],
                    both["context_mask"],
                    interval=torch.zeros_like(torch.cat([t_net, t_net])),
                )
        finally:
            module.denoiser.train(was_training)
        u_cond, u_uncond = out.float().chunk(2)
        guided = guided_velocity(v.float(), u_cond, u_uncond, scale, self.kappa).to(v.dtype)
        return torch.where(active.to(v.device).reshape(-1, *([1] * (v.ndim - 1))), guided, v)
