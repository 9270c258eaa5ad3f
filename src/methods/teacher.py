"""Teachers of distillation methods: read once from a checkpoint or export through the trust gate, checked against
the student's setup, frozen."""

from __future__ import annotations

from typing import Any, Callable

import torch

from difflab.diffusion.system import Diffusion
from difflab.utils.errors import ConfigError
from difflab.utils.frozen import Frozen


def load_teacher(path: str, student: Diffusion, key: str = "method.teacher_ckpt") -> Any:
    """The teacher module (EMA weights, eval mode, no gradients) of checkpoint or export ``path``; refuses one line
    when it is not a diffusion model or its process, schedule, prediction, sample shape or conditioning differ."""
    from difflab.checkpoints import module_from_checkpoint  # file IO stays out of the method's imports

    teacher = module_from_checkpoint(path)
    other = getattr(teacher, "diffusion", None)
    if not isinstance(other, Diffusion):
        raise ConfigError(f"{key}={path} is not a diffusion model checkpoint")
    problem = student.mismatch(other, roles=("teacher", "student"))
    if problem is not None:
        raise ConfigError(f"{key}={path} cannot teach this model: different {problem}")
    teacher.requires_grad_(False)
    return teacher.eval()


def start_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module, key: str, path: str) -> None:
    """Copy the teacher's weights into the student (the distillation methods' starting point); one line when the
    networks differ."""
    try:
        student.load_state_dict(teacher.state_dict())
    except RuntimeError as err:
        detail = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err).splitlines()[0])
        raise ConfigError(
            f"{key}={path} has another network than this run's model.net ({detail}): distil into the teacher's "
            "architecture (the model group and model.net settings it was trained with)"
        ) from None


def adopt_teacher(
    module: Any, path: str, guidance: Any = None, widen: Callable[[torch.nn.Module], None] | None = None
) -> Frozen:
    """The frozen teacher of a distillation run, read from ``path`` (``method.teacher_ckpt``), with the student
    ``module`` started as it and ``guidance`` (the method's teacher guidance) holding the teacher's kept guide.
    ``widen`` gives the teacher's denoiser an input its student has and it lacks, adding nothing to its output
    (``add_guidance_input``), so the two keep one set of weights."""
    teacher = load_teacher(path, module.diffusion, "method.teacher_ckpt")
    if widen is not None:
        try:
            widen(teacher.denoiser)
        except ValueError as err:
            raise ConfigError(f"method.teacher_ckpt={path}: {err}") from None
    start_from_teacher(module, teacher, "method.teacher_ckpt", path)
    if guidance is not None:
        guidance.carry_state_from(teacher.diffusion.guidance)  # a kept autoguidance guide
    return Frozen(teacher)


def raw_subset(raw: Any, rows: torch.Tensor) -> Any:
    """The raw conditions (labels, prompts or None) of the rows where ``rows`` is true."""
    if raw is None:
        return None
    if isinstance(raw, torch.Tensor):
        return raw[rows]
    return [r for r, keep in zip(raw, rows.tolist()) if keep]
