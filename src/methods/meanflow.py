"""MeanFlow (Geng et al. 2025, arXiv 2505.13447): a flow model of average velocities u(z, r, t), trained from scratch
with the MeanFlow identity through one forward-mode derivative per step, sampled in one step with
``sampler=meanflow``."""

from __future__ import annotations

from typing import Any

import torch

from difflab.diffusion.consistency import time_derivative
from difflab.diffusion.meanflow import adaptive_l2, meanflow_target, meanflow_times
from difflab.diffusion.processes import FlowProcess
from difflab.diffusion.samplers import Sampler, sampler_name
from difflab.methods.base import TrainingMethod
from difflab.utils.errors import ConfigError


class MeanFlowTraining(TrainingMethod):
    """The denoiser (built with ``model.net.interval_input=true``: it embeds t - r beside t) predicts the average
    velocity over [r, t] and regresses on the stopped-gradient target v - (t - r) du/dt, du/dt its own derivative
    along the conditional path at fixed r. (t, r) are logit-normal(``p_mean``, ``p_std``), with r != t for a fraction
    ``ratio``; the squared error is weighted adaptively (``adaptive_p``, ``adaptive_c``). Conditions are dropped with
    the diffusion's ``p_uncond``, so classifier-free guidance still applies. Flow process, velocity target."""

    name = "meanflow"

    def __init__(
        self,
        ratio: float = 0.25,
        p_mean: float = -0.4,
        p_std: float = 1.0,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
    ) -> None:
        if not 0 <= ratio <= 1 or p_std <= 0 or adaptive_p < 0 or adaptive_c <= 0:
            raise ConfigError(
                f"method=meanflow needs 0 <= ratio <= 1, p_std > 0, adaptive_p >= 0 and adaptive_c > 0; got "
                f"ratio={ratio}, p_std={p_std}, adaptive_p={adaptive_p}, adaptive_c={adaptive_c}"
            )
        self.ratio, self.p_mean, self.p_std = float(ratio), float(p_mean), float(p_std)
        self.adaptive_p, self.adaptive_c = float(adaptive_p), float(adaptive_c)

    def check(self, process: Any, sampler: Sampler) -> None:
        """Refuse (ValueError) a process other than flow, or a student sampler other than ``meanflow``."""
        if not isinstance(process, FlowProcess):
            raise ValueError(f"method=meanflow trains on the flow process (process=flow), not {process.name}")
        name = sampler_name(sampler)
        if not name.startswith("meanflow"):
            raise ValueError(f"method=meanflow samples with sampler=meanflow (1 or a few steps), not {name}")

    def describe(self) -> str:
        return (
            f"MeanFlow from scratch, r != t for {self.ratio:g} of the samples, adaptive weighting p={self.adaptive_p:g}"
        )

    def setup(self, module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.refuse_misfit(module)
        if module.diffusion.objective.prediction != "flow":
            raise ConfigError(
                f"method=meanflow regresses velocities: set objective.prediction=flow (got "
                f"{module.diffusion.objective.prediction})"
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
        cond = d.condition(d.conditioner.drop(d.batch_condition(batch), d.p_uncond))
        t, r = (v.to(x0.device) for v in meanflow_times(x0.shape[0], self.ratio, self.p_mean, self.p_std))
        eps = torch.randn_like(x0)
        a_t, s_t = process.coefficients_like(t, x0)
        z = a_t * x0 + s_t * eps
        v = eps - x0
        r_net = process.net_time(r).to(x0.device)

        def u(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t_net = process.net_time(t).to(z.device)
            return module(z, t_net, cond["vector"], cond["context"], cond["context_mask"], interval=t_net - r_net)

        u_theta, du_dt = time_derivative(u, z, t, v)  # one pass: its primal output carries the gradient
        target = meanflow_target(v, du_dt.detach().float(), t, r)
        return adaptive_l2(u_theta.float(), target, self.adaptive_p, self.adaptive_c).mean()
