"""Guidance baked into a distilled student (Meng et al. 2023, arXiv 2210.03142), shared by every distillation method's
``method.guidance_scales``: each training sample draws a scale w ~ U[lo, hi] that guides the teacher's targets and is
handed to the student as an input, so one student samples at any scale in the range with one network pass per step
(``guidance=distilled``)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from difflab.diffusion.guidance import DistilledGuidance, Guidance, check_method
from difflab.models.layers import add_guidance_input, has_guidance_input
from difflab.utils.errors import ConfigError

KEY = "method.guidance_scales"


class GuidanceScales:
    """The range [lo, hi] a guidance-distilled student learns; ``parse`` turns the config value into one (or None)."""

    widen = staticmethod(add_guidance_input)  # adopt_teacher's widen: the teacher gains the student's silent input

    def __init__(self, lo: float, hi: float) -> None:
        if not 0 <= lo < hi:
            raise ConfigError(
                f"{KEY}={[lo, hi]} must be [lo, hi] with 0 <= lo < hi (the guidance scales the student learns, e.g. "
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

    def refuse_misfit(self, module: Any, teacher_guidance: Guidance | None) -> None:
        """One line when the student cannot take a scale or does not sample with it, or the teacher's guidance (the
        method's; None: the module's own) cannot use every scale in the range (CFG++'s lambda lies in [0, 1])."""
        guidance = teacher_guidance or module.diffusion.guidance
        if guidance.name == "autoguidance_cfg":  # two strengths: a drawn scale would vary one of them only
            raise ConfigError(
                f"{KEY}={self!r} cannot guide the teacher's autoguidance_cfg (its scale is the guide's w, its CFG term "
                "stays at cfg_scale): guide the teacher with cfg_interval, cfg, apg or autoguidance"
            )
        try:
            check_method(guidance.name, torch.tensor([self.lo, self.hi]))
        except ValueError as err:
            raise ConfigError(
                f"{KEY}={self!r} cannot all guide the teacher's {guidance.name} ({err}): choose scales that guidance "
                "takes"
            ) from None
        if not has_guidance_input(module.denoiser):
            raise ConfigError(
                f"{KEY} needs a student with a guidance-scale input: set model.net.guidance_input=true (any difflab "
                "denoiser), as experiment=digits_progressive_guided does"
            )
        if not isinstance(module.diffusion.guidance, DistilledGuidance):
            raise ConfigError(
                f"{KEY} trains a student that samples with guidance=distilled (the scale as its input), but "
                f"model.diffusion.guidance is {module.diffusion.guidance.name}: set it as "
                "experiment=digits_progressive_guided does"
            )
