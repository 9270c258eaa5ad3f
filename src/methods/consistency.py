"""Consistency models by easy consistency tuning (ECT, Geng et al. 2024, arXiv 2406.14548), or by consistency
distillation from a guided teacher (Song et al. 2023, arXiv 2303.01469) with ECT's shrinking time gaps; sampled in one
or a few steps with ``sampler=consistency``."""

from __future__ import annotations

from typing import Any, Sequence, cast

import torch

from difflab.diffusion.consistency import consistency_loss, ect_earlier_sigma, ict_huber_c
from difflab.diffusion.guidance import Guidance
from difflab.diffusion.processes import NoiseProcess
from difflab.diffusion.samplers import Sampler, sampler_name
from difflab.methods.base import TrainingMethod
from difflab.methods.guidance_input import GuidanceScales, adopt_teacher_of
from difflab.methods.teacher import raw_subset
from difflab.utils.errors import ConfigError
from difflab.utils.frozen import Frozen


def same_randomness(device: torch.device) -> Any:
    """A block after which the random state is as it was before it (``torch.random.fork_rng``): the second network
    call of a consistency pair sees the first one's dropout masks (ECT's shared dropout)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class ConsistencyTraining(TrainingMethod):
    """f(x, t) = the denoiser's x0 estimate, trained so that f(x_t, t) equals a stopped-gradient f(x_r, r) at the
    earlier noise level sigma_r = ``ect_earlier_sigma(sigma_t, stage)``; the stage grows by one every
    ``double_every`` steps (the gap halves). Noise levels sigma_t ~ lognormal(``p_mean``, ``p_std``) (EDM's sigma,
    mapped to the process's time). Without a teacher (ECT), x_r shares x_t's noise on the forward path (from this
    run's weights: ``init_from`` a diffusion checkpoint tunes it, none trains from scratch) and sigma_r = 0 targets
    the data. With ``teacher_ckpt`` (consistency distillation), the student starts as the teacher and x_r is the
    teacher's DDIM step from x_t guided by ``teacher_guidance``; with ``guidance_scales`` too, at a scale drawn per
    sample that the student takes as input (one student for every scale). Loss: ECT's pseudo-Huber distance
    (``huber_c``; null: iCT's 0.00054 sqrt(dim)) over sigma_t - sigma_r."""

    name = "consistency"
    fixed_on_resume: tuple[str, ...] = ("double_every", "q", "k", "b")  # the gap schedule follows the step

    def __init__(
        self,
        teacher_ckpt: str | None = None,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        double_every: int = 400,
        huber_c: float | None = None,
        teacher_guidance: Guidance | None = None,
        time_groups: int = 8,
        guidance_scales: Sequence[float] | None = None,
    ) -> None:
        if p_std <= 0 or q <= 1 or double_every < 1 or time_groups < 1 or (huber_c is not None and huber_c < 0):
            raise ConfigError(
                f"method=consistency needs p_std > 0, q > 1, double_every >= 1, time_groups >= 1 and huber_c >= 0 "
                f"(or null); got p_std={p_std}, q={q}, double_every={double_every}, time_groups={time_groups}, "
                f"huber_c={huber_c}"
            )
        self.teacher_ckpt = str(teacher_ckpt) if teacher_ckpt else None
        self.needs_teacher = self.teacher_ckpt is not None
        self.p_mean, self.p_std, self.q, self.k, self.b = float(p_mean), float(p_std), float(q), float(k), float(b)
        self.double_every, self.huber_c = int(double_every), huber_c
        self.teacher_guidance = teacher_guidance
        self.guidance_scales = GuidanceScales.parse(guidance_scales)
        if self.guidance_scales is not None and self.teacher_ckpt is None:
            raise ConfigError(
                f"method.guidance_scales={self.guidance_scales!r} bakes a teacher's guidance into the student: set "
                f"method.teacher_ckpt, or method.guidance_scales=null to train {self.name} without one"
            )
        self.time_groups = int(time_groups)
        self.stage = 0
        self._teacher: Frozen | None = None

    def check(self, process: NoiseProcess, sampler: Sampler) -> None:
        """Refuse (ValueError) a discrete process (its times cannot shrink a gap continuously) or a student sampler
        other than ``consistency`` (a consistency model's x0 is its sample)."""
        if not process.continuous:
            raise ValueError(
                f"method=consistency needs a continuous process (flow or edm): process {process.name} has discrete "
                "timesteps"
            )
        if not sampler_name(sampler).startswith("consistency"):
            raise ValueError(
                f"method=consistency trains a consistency model, sampled with sampler=consistency (1 or a few "
                f"steps), not {sampler_name(sampler)}"
            )

    def describe(self) -> str:
        source = f"distilled from {self.teacher_ckpt}" if self.teacher_ckpt else "tuned from this run's weights (ECT)"
        if self.guidance_scales is not None:
            source += f", guided {self.guidance_scales.describe()}"
        return f"consistency training, {source}, gap halving every {self.double_every} steps"

    # ---------------------------------------------------------------- hooks
    def setup(self, module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.refuse_misfit(module)
        if self.teacher_ckpt is not None:
            self._teacher = adopt_teacher_of(module, self.teacher_ckpt, self.teacher_guidance, self.guidance_scales)

    def on_train_batch_start(self, module: Any, step: int) -> None:
        self.stage = step // self.double_every  # a function of the step: exact on resume with no state of its own
        module.log("method/stage", float(self.stage), prog_bar=False)

    # ---------------------------------------------------------------- the loss
    def noise_levels(self, n: int) -> torch.Tensor:
        """EDM sigmas for n samples (float64), lognormal(``p_mean``, ``p_std``); with a teacher, ``time_groups``
        distinct levels spread over the rows (one guided teacher call each)."""
        draw = lambda k: (torch.randn(k, dtype=torch.float64) * self.p_std + self.p_mean).exp()  # noqa: E731
        if self._teacher is None:
            return draw(n)
        levels = draw(min(n, self.time_groups))
        return levels[torch.randperm(n) % len(levels)]

    def times(self, n: int, process: NoiseProcess, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r) in process time for n samples: sigma_t from ``noise_levels``, sigma_r ECT's earlier level at this
        stage."""
        sigma_t = self.noise_levels(n)
        sigma_r = ect_earlier_sigma(sigma_t, self.stage, self.q, self.k, self.b)
        to_time = lambda s: process.time_from_log_snr(-2 * s.log()).to(device)  # noqa: E731 - sigma 0: t 0
        return to_time(sigma_t), to_time(sigma_r)

    @torch.no_grad()
    def teacher_predictions(
        self, x_t: torch.Tensor, raw: Any, t: torch.Tensor, scales: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The guided teacher's (x0, eps) at each x_t and its process time t (at each sample's ``scales`` when
        given); one guided call per distinct t."""
        assert self._teacher is not None, "setup() loads the teacher first"
        teacher: Any = self._teacher.module
        if self._teacher.device != x_t.device:
            self._teacher.to(x_t.device)
        dtype = next(teacher.parameters()).dtype
        x0, eps = torch.empty_like(x_t), torch.empty_like(x_t)
        for value in t.unique().tolist():
            rows = t == value
            w = None if scales is None else scales[rows]
            fn = teacher.diffusion.guided_fn(teacher, raw_subset(raw, rows), self.teacher_guidance, scale=w)
            x0[rows], eps[rows] = (v.to(x_t.dtype) for v in fn(x_t[rows].to(dtype), value))
        return x0, eps

    def draw_scales(self, x0: torch.Tensor) -> torch.Tensor | None:
        """Each sample's guidance scale (the student's input and the teacher's strength; None without
        ``guidance_scales``)."""
        return None if self.guidance_scales is None else self.guidance_scales.draw(x0.shape[0], x0.device)

    def teacher_step(
        self, x_t: torch.Tensor, raw: Any, t: torch.Tensor, r: torch.Tensor, scales: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The guided teacher's DDIM step from each x_t at t to its r (x0 where r is 0)."""
        x0, eps = self.teacher_predictions(x_t, raw, t, scales)
        teacher: Any = cast(Frozen, self._teacher).module
        a_r, s_r = teacher.diffusion.process.coefficients_like(r, x0)
        return a_r * x0 + s_r * eps  # the deterministic DDIM step, per-row r

    def loss(self, module: Any, batch: dict[str, Any]) -> torch.Tensor:
        d = module.diffusion
        process = d.process
        x0 = batch["x"]
        raw = d.batch_condition(batch)
        if self._teacher is None:  # ECT: conditions dropped like diffusion training, so CFG still works
            raw = d.conditioner.drop(raw, d.p_uncond)
        t, r = self.times(x0.shape[0], process, x0.device)
        noise = torch.randn_like(x0)
        scales = self.draw_scales(x0)
        cond = GuidanceScales.into(d.condition(raw), scales)
        a_t, s_t = process.coefficients_like(t, x0)
        x_t = a_t * x0 + s_t * noise
        if self._teacher is not None:
            x_r = self.teacher_step(x_t, raw, t, r, scales)
        else:
            a_r, s_r = process.coefficients_like(r, x0)
            x_r = a_r * x0 + s_r * noise
        with same_randomness(x0.device):
            f_t = d.x0_estimate(module, x_t, t, cond)
        with torch.no_grad():
            f_r = d.x0_estimate(module, x_r, r, cond)
        clean = (process.sigma_ve_at(r) <= 0).to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
        f_r = torch.where(clean, x_r.float(), torch.nan_to_num(f_r))  # at sigma 0, f is the identity
        sigma_t, sigma_r = (process.sigma_ve_at(v).to(x0.device).float() for v in (t, r))
        c = self.huber_c if self.huber_c is not None else ict_huber_c(x0[0].numel())
        return consistency_loss(f_t, f_r, sigma_t, sigma_r, c).mean()
