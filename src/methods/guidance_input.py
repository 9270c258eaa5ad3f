"""Guidance baked into a distilled student (Meng et al. 2023, arXiv 2210.03142), shared by every distillation method's
``method.guidance_scales``: each training sample draws a scale w ~ U[lo, hi] that guides the teacher's targets and is
handed to the student as an input, so one student samples at any scale in the range with one network pass per step
(``guidance=distilled``)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from difflab.diffusion.guidance import DistilledGuidance, Guidance, check_method
from difflab.methods.teacher import adopt_teacher
from difflab.models.layers import add_guidance_input, has_guidance_input
from difflab.utils.errors import ConfigError
from difflab.utils.frozen import Frozen

KEY = "method.guidance_scales"


class GuidanceScales:
    """The range [lo, hi] a guidance-distilled student learns; ``parse`` turns the config value into one (or None)."""

    def __init__(self, lo: float, hi: float) -> None:
        if not 0 <= lo < hi < math.inf:
            raise ConfigError(
                f"{KEY}={[lo, hi]} must be [lo, hi] with 0 <= lo < hi, finite (the guidance scales the student learns, e.g. "
                "[1, 4]), or null"
            )
        self.lo, self.hi = float(lo), float(hi)

    @classmethod
    def parse(cls, value: Sequence[float] | None) -> "GuidanceScales | None":
        """The range of a ``method.guidance_scales`` value (None: guidance is not an input)."""
        if value is None:
            return None
        scales = [float(v) for v in value]
        if len(scales) != 2:
            raise ConfigError(
                f"{KEY}={scales} must be [lo, hi] with 0 <= lo < hi (the guidance scales the student learns, e.g. "
                "[1, 4]), or null"
            )
        return cls(*scales)

    def __repr__(self) -> str:
        return f"[{self.lo}, {self.hi}]"

    def describe(self) -> str:
        return f"at scales drawn from U{self!r} (the student's input)"

    def draw(self, n: int, device: Any = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """n scales from U[lo, hi] (float32)."""
        return self.lo + (self.hi - self.lo) * torch.rand(n, device=device, generator=generator)

    @staticmethod
    def into(cond: dict[str, Any], scales: torch.Tensor | None) -> dict[str, Any]:
        """The student's conditions with each sample's scale as its input (unchanged when ``scales`` is None)."""
        return cond if scales is None else {**cond, "guidance_scale": scales}

    def adopt_teacher(self, module: Any, path: str, teacher_guidance: Guidance | None) -> Frozen:
        """The frozen teacher of a student that takes the scale as input (``teacher.adopt_teacher``, the teacher
        given the student's silent input): a misfit student refused before the file is read, a teacher guidance
        (the method's; None: the teacher checkpoint's own) that cannot take every scale after."""
        self.refuse_student(module)
        frozen = adopt_teacher(module, path, teacher_guidance, add_guidance_input)
        teacher: Any = frozen.module  # a DiffusionModule
        self.refuse_teacher_guidance(teacher_guidance or teacher.diffusion.guidance)
        return frozen

    def refuse_student(self, module: Any) -> None:
        """One line when the student cannot take a scale or does not sample with it."""
        if not has_guidance_input(module.denoiser):
            raise ConfigError(
                f"{KEY} needs a student with a guidance-scale input: set model.net.guidance_input=true (any difflab "
                "denoiser), as the experiments digits_*_guided do"
            )
        if not isinstance(module.diffusion.guidance, DistilledGuidance):
            raise ConfigError(
                f"{KEY} trains a student that samples with guidance=distilled (the scale as its input), but "
                f"model.diffusion.guidance is {module.diffusion.guidance.name}: set it as the experiments "
                "digits_*_guided do"
            )

    def refuse_teacher_guidance(self, guidance: Guidance) -> None:
        """One line when the teacher's guidance cannot be run at every scale in the range: two strengths
        (autoguidance_cfg), per-class scales, a scale input the teacher never learned (distilled), or scales the
        method does not take (CFG++'s lambda lies in [0, 1])."""
        if guidance.name == "autoguidance_cfg":  # two strengths: a drawn scale would vary one of them only
            raise ConfigError(
                f"{KEY}={self!r} cannot guide the teacher's autoguidance_cfg (its scale is the guide's w, its CFG term "
                "stays at cfg_scale): guide the teacher with cfg_interval, cfg, apg or autoguidance"
            )
        if guidance.name == "distilled":
            raise ConfigError(
                f"{KEY}={self!r} guides the teacher, which has no scale input (guidance=distilled is how the student "
                "samples, set by model.diffusion.guidance): guide the teacher with cfg_interval, cfg, apg or "
                "autoguidance"
            )
        if getattr(guidance, "per_class", None):
            raise ConfigError(
                f"{KEY}={self!r} draws each sample's scale, so the teacher's guidance.per_class cannot also set it: "
                "set guidance.per_class=null (the student samples with per-class scales afterwards if wanted)"
            )
        try:
            check_method(guidance.name, torch.tensor([self.lo, self.hi]))
        except ValueError as err:
            raise ConfigError(
                f"{KEY}={self!r} cannot all guide the teacher's {guidance.name} ({err}): choose scales that guidance "
                "takes"
            ) from None


def adopt_teacher_of(
    module: Any, path: str, teacher_guidance: Guidance | None, scales: GuidanceScales | None
) -> Frozen:
    """A distillation method's frozen teacher: ``teacher.adopt_teacher``, or ``scales.adopt_teacher`` when the
    student takes the guidance scale as input."""
    if scales is None:
        return adopt_teacher(module, path, teacher_guidance)
    return scales.adopt_teacher(module, path, teacher_guidance)
