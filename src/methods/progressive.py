"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512): a student learns to take one DDIM step where
its teacher takes two, halving the step count per round; rounds run as one training command."""

from __future__ import annotations

import bisect
import itertools
import logging
from typing import Any, Sequence

import torch

from difflab.diffusion.distillation import halving_grid, progressive_target, truncated_snr_weight
from difflab.diffusion.guidance import CFG, DistilledGuidance, Guidance
from difflab.diffusion.processes import NoiseProcess
from difflab.diffusion.samplers import Sampler, ddim_step, sampler_name
from difflab.methods.base import TrainingMethod
from difflab.methods.guidance_input import GuidanceScales, adopt_teacher_of
from difflab.methods.rounds import budget_mismatch, is_listed, round_count, round_lengths
from difflab.methods.teacher import raw_subset
from difflab.ops.fsdp import is_sharding
from difflab.utils.errors import ConfigError
from difflab.utils.frozen import Frozen

log = logging.getLogger(__name__)


class ProgressiveDistillation(TrainingMethod):
    """Distil ``teacher_ckpt`` from ``teacher_steps`` DDIM steps down to ``student_steps`` in log2(ratio) rounds of
    ``steps_per_round`` optimizer steps (a list: each round's own). The student starts as the teacher; at each
    round's end it becomes the teacher of the next. The first round's teacher steps are guided by ``teacher_guidance``
    (the ``guidance`` group; None: the teacher checkpoint's own); later teachers are students, which carry the
    guidance already and step unguided. The student samples unguided with ``sampler=ddim`` (eta 0) at ``student_steps``.
    Loss: x0 error weighted by max(snr, 1) at the student grid's times."""

    name = "progressive"
    needs_teacher = True
    fixed_on_resume = ("teacher_steps", "student_steps", "steps_per_round")  # the rounds the saved state counts in

    def __init__(
        self,
        teacher_ckpt: str | None = None,
        teacher_steps: int = 16,
        student_steps: int = 1,
        steps_per_round: int | Sequence[int] = 500,
        teacher_guidance: Guidance | None = None,
        guidance_scales: Sequence[float] | None = None,
    ) -> None:
        if not teacher_ckpt:
            raise ConfigError(
                "method=progressive needs method.teacher_ckpt: the checkpoint or export of the model to distil "
                "(e.g. a default digits run's checkpoints/last.ckpt)"
            )
        ratio = teacher_steps / student_steps if student_steps >= 1 else 0
        if student_steps < 1 or ratio < 2 or not float(ratio).is_integer() or int(ratio) & (int(ratio) - 1):
            raise ConfigError(
                f"method.teacher_steps={teacher_steps} and method.student_steps={student_steps}: the teacher's steps "
                "must be the student's times a power of two >= 2 (each round halves them), e.g. 16 and 1"
            )
        self.rounds = round_count(teacher_steps, student_steps)
        self.round_lengths = round_lengths(steps_per_round, self.rounds)
        self.guidance_scales = GuidanceScales.parse(guidance_scales)
        self.teacher_ckpt = str(teacher_ckpt)
        self.teacher_steps, self.student_steps = int(teacher_steps), int(student_steps)
        self.steps_per_round = list(self.round_lengths) if is_listed(steps_per_round) else steps_per_round
        self.round_ends = list(itertools.accumulate(self.round_lengths))
        self.teacher_guidance = teacher_guidance
        self.round = 0
        self._teacher: Frozen | None = None
        self._pending_teacher: dict[str, torch.Tensor] | None = None
        self.spacing: Any = None  # the student sampler's grid spacing, read in setup

    # ---------------------------------------------------------------- settings
    def round_at(self, step: int) -> int:
        """The round (0-based) that optimizer step ``step`` trains in; steps past the last round stay in it."""
        return min(bisect.bisect_right(self.round_ends, step), self.rounds - 1)

    def steps_in_round(self, r: int) -> int:
        """The student's DDIM step count in round ``r`` (0-based): teacher_steps / 2^(r + 1)."""
        return self.teacher_steps >> (r + 1)

    def check(self, process: NoiseProcess, sampler: Sampler) -> None:
        """Refuse (ValueError) a student sampler other than deterministic DDIM at ``student_steps``, or a process whose
        grids (at the sampler's spacing) do not nest at every round."""
        eta = getattr(sampler, "keywords", {}).get("eta") or 0.0
        if sampler_name(sampler) != f"ddim-{self.student_steps}" or eta != 0:
            raise ValueError(
                f"method=progressive trains a deterministic {self.student_steps}-step DDIM student, but sampler is "
                f"{sampler_name(sampler)} (eta {eta}): use sampler=ddim sampler.steps={self.student_steps} sampler.eta=0"
            )
        for r in range(self.rounds):
            halving_grid(process, self.steps_in_round(r), self._spacing(sampler))

    @staticmethod
    def _spacing(sampler: Sampler) -> Any:
        return getattr(sampler, "keywords", {}).get("spacing")

    def describe(self) -> str:
        guided = "the teacher's own guidance" if self.teacher_guidance is None else repr(self.teacher_guidance)
        if self.guidance_scales is not None:
            guided += " " + self.guidance_scales.describe()
        return (
            f"progressive distillation: DDIM {self.teacher_steps} -> {self.student_steps} steps in {self.rounds} "
            f"rounds of {self.steps_per_round} steps, teacher {self.teacher_ckpt} guided by {guided}"
        )

    # ---------------------------------------------------------------- hooks
    def setup(self, module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.refuse_misfit(module)
        trainer = getattr(module, "_trainer", None)
        if is_sharding(trainer):
            raise ConfigError("method=progressive does not run under trainer=fsdp yet: use trainer=gpu or ddp")
        self.spacing = self._spacing(module.diffusion.sampler)
        self.warn_if_budget_differs(getattr(trainer, "max_steps", None))
        self._teacher = adopt_teacher_of(module, self.teacher_ckpt, self.teacher_guidance, self.guidance_scales)
        if self._pending_teacher is not None:
            self.load_state_dict({"round": self.round, "teacher": self._pending_teacher})

    def warn_if_budget_differs(self, max_steps: int | None) -> str | None:
        """Log a warning when ``trainer.max_steps`` is not the rounds' total (``budget_mismatch``); returns it."""
        mismatch = budget_mismatch(self.round_lengths, max_steps)
        if mismatch is not None:
            log.warning(
                "method=progressive: trainer.max_steps=%s but the rounds (method.steps_per_round=%s) add up to %d: %s "
                "(trainer.max_steps=%d runs every round in full and stops)",
                max_steps,
                self.steps_per_round,
                sum(self.round_lengths),
                mismatch,
                sum(self.round_lengths),
            )
        return mismatch

    def on_train_batch_start(self, module: Any, step: int) -> None:
        r = self.round_at(step)
        if r > self.round and self._teacher is not None:  # the round's student teaches the next round
            self._teacher.module.load_state_dict({k: v.detach().float() for k, v in module.state_dict().items()})
            self.round = r
        module.log("method/student_steps", float(self.steps_in_round(self.round)), prog_bar=False)

    def state_dict(self) -> dict[str, Any]:
        teacher = None
        if self._teacher is not None and self.round > 0:  # round 0's teacher is the file
            teacher = {k: v.detach().cpu() for k, v in self._teacher.module.state_dict().items()}
        return {"round": self.round, "teacher": teacher}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state.get("round", 0))
        weights = state.get("teacher")
        if weights is None:
            return
        if self._teacher is None:
            self._pending_teacher = weights
            return
        self._teacher.module.load_state_dict(weights)
        self._pending_teacher = None

    # ---------------------------------------------------------------- the loss
    @torch.no_grad()
    def teacher_two_steps(
        self, x_t: torch.Tensor, raw: Any, index: torch.Tensor, grid: list, scales: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Two DDIM steps of the teacher from each sample's grid time 2i to 2i + 2 (grid: the round's
        [(t, alpha, sigma)] of 2 N steps), guided in the first round only (at each sample's ``scales`` when given;
        later teachers take them as input); one teacher call per distinct i."""
        assert self._teacher is not None, "setup() loads the teacher before training"
        teacher: Any = self._teacher.module  # a DiffusionModule (its diffusion and forward)
        if self._teacher.device != x_t.device:
            self._teacher.to(x_t.device)
        guidance: Guidance | None = self.teacher_guidance
        if self.round > 0:  # later teachers are students: they carry the guidance already
            guidance = CFG(scale=1.0) if scales is None else DistilledGuidance()
        dtype = next(teacher.parameters()).dtype  # the frozen teacher keeps its own precision
        x_s = torch.empty_like(x_t)
        for i in index.unique().tolist():
            rows = index == i
            w = None if scales is None else scales[rows]
            fn = teacher.diffusion.guided_fn(teacher, raw_subset(raw, rows), guidance, scale=w)
            x = x_t[rows].to(dtype)
            for (t, _, _), (_, a_next, s_next) in zip(grid[2 * i : 2 * i + 2], grid[2 * i + 1 : 2 * i + 3]):
                x0_hat, eps_hat = fn(x, t)
                x = ddim_step(x0_hat, eps_hat, a_next, s_next)
            x_s[rows] = x.to(x_s.dtype)
        return x_s

    def loss(self, module: Any, batch: dict[str, Any]) -> torch.Tensor:
        d = module.diffusion
        process = d.process
        n = self.steps_in_round(self.round)
        times = halving_grid(process, n, self.spacing)
        alphas, sigmas = process.coefficients(times)
        grid = list(zip(times.tolist(), alphas.tolist(), sigmas.tolist()))
        x0 = batch["x"]
        raw = d.batch_condition(batch)  # conditional only: the guidance is in the teacher's targets
        index = torch.randint(n, (x0.shape[0],), device=x0.device)
        shape = (-1, *([1] * (x0.ndim - 1)))
        at = lambda k: tuple(v.to(x0.device, x0.dtype)[k].reshape(shape) for v in (alphas, sigmas))  # noqa: E731
        (alpha_t, sigma_t), (alpha_s, sigma_s) = at(2 * index), at(2 * index + 2)
        x_t = alpha_t * x0 + sigma_t * torch.randn_like(x0)
        scales = None
        if self.guidance_scales is not None:  # Meng et al.: w ~ U[lo, hi] per sample, the student's input
            scales = self.guidance_scales.draw(x0.shape[0], x0.device)
        x_s = self.teacher_two_steps(x_t, raw, index, grid, scales)
        target = progressive_target(x_t, x_s, alpha_t, sigma_t, alpha_s, sigma_s)
        t = times.to(x0.device)[2 * index]
        cond = GuidanceScales.into(d.condition(raw), scales)
        x0_hat = d.x0_estimate(module, x_t, t, cond)
        err = ((x0_hat - target.float()) ** 2).mean(dim=tuple(range(1, x0.ndim)))
        return (truncated_snr_weight(alpha_t, sigma_t).flatten().float() * err).mean()
