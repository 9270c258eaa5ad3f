"""Training methods (config group ``method/``): what one training step optimises, around a ``Diffusion``.

A method is the loss of a step plus the state it keeps between steps (a teacher, a round counter). The
``DiffusionModule`` owns the weights, optimizer and checkpoints and calls its method's hooks; a new method is one
subclass in its own file plus one ``configs/method/<name>.yaml``. Methods hold no registered submodules: a teacher
lives in a ``Frozen`` holder, so it is never in the student's ``state_dict``, optimizer or EMA copy.
"""

from __future__ import annotations

from typing import Any

import torch

from difflab.diffusion.objectives import NoiseLevelWeighting, uncertainty_weighted
from difflab.utils.errors import ConfigError


class TrainingMethod:
    """A training method's hooks, called by ``DiffusionModule``; the defaults do nothing."""

    name = "base"
    needs_teacher = False
    # a learned loss weighting (EDM2's uncertainty) when the method has one
    weighting: NoiseLevelWeighting | None = None
    # settings a resume must share with the checkpoint's run (a distillation's rounds): ops.resume.refuse_changed_settings
    fixed_on_resume: tuple[str, ...] = ()

    def setup(self, module: Any, stage: str) -> None:
        """Before training (Lightning's ``setup``, ahead of any checkpoint restore): load teachers, start students."""

    def check(self, process: Any, sampler: Any) -> None:
        """Refuse (ValueError, one line) a process or student sampler this method cannot train; the pre-flight calls
        it too (``config_checks.constructor_problems``)."""

    def refuse_misfit(self, module: Any) -> None:
        """``check`` on the module's process and sampler, as the one-line ConfigError a run stops with."""
        try:
            self.check(module.diffusion.process, module.diffusion.sampler)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def on_train_batch_start(self, module: Any, step: int) -> None:
        """Before the optimizer step with global index ``step``."""

    def loss(self, module: Any, batch: dict[str, Any]) -> torch.Tensor:
        """The scalar loss of one batch for ``module`` (a ``DiffusionModule``: its forward is the denoiser's)."""
        raise NotImplementedError

    def parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters of the method itself (its learned loss weighting), optimised with the network's but
        kept out of its state dict: a student stays an ordinary checkpoint. Their state travels in ``state_dict``."""
        return list(self.weighting.parameters()) if self.weighting is not None else []

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this method exactly (tensors and plain values)."""
        return {"weighting": self.weighting.state_dict()} if self.weighting is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s output (resume); a checkpoint whose method learned a loss weighting where this
        run's does not (or the other way round) is refused: its optimizer state would not fit."""
        if ("weighting" in state) != (self.weighting is not None):
            had = "learned" if "weighting" in state else "did not learn"
            raise ConfigError(
                f"ckpt_path: the checkpoint's training {had} a loss weighting and this run's method={self.name} "
                f"{'does not' if self.weighting is None else 'does'} (method.adaptive_weighting): resume with the "
                "settings it was trained with"
            )
        if self.weighting is not None:
            self.weighting.load_state_dict(state["weighting"])

    def learned_logvar(self, sigma: torch.Tensor) -> torch.Tensor | float:
        """The learned weighting's log-variance at each sample's EDM noise level ``sigma`` (0 without one: the plain
        loss), on ``sigma``'s device (moved in place: the optimizer keeps the same tensors)."""
        if self.weighting is None:
            return 0.0
        with torch.autocast(sigma.device.type, enabled=False):  # fp32 under bf16 autocast, as EDM2 keeps it
            return self.weighting.to(sigma.device)(sigma)

    def describe(self) -> str:
        """One line for the log: the method and its settings."""
        return self.name


class DiffusionTraining(TrainingMethod):
    """Denoising score matching under the module's ``Diffusion``: the objective's loss at the process's times, with
    conditions dropped for classifier-free guidance (today's training; the default). ``adaptive_weighting`` learns
    EDM2's per-noise-level uncertainty u(sigma) on top of the objective's weighting: each sample's loss becomes
    loss e^(-u) + u (Karras et al. 2024), which evens out the levels' gradients as training goes."""

    name = "diffusion"
    fixed_on_resume = ("adaptive_weighting",)  # a learned weighting adds optimizer state

    def __init__(self, adaptive_weighting: bool = False) -> None:
        self.weighting = NoiseLevelWeighting() if adaptive_weighting else None

    def loss(self, module: Any, batch: dict[str, Any]) -> torch.Tensor:
        if self.weighting is None:
            return module.diffusion.loss(module, batch)
        out = module.diffusion.losses(module, batch)
        sigma = torch.exp(-0.5 * out["log_snr"].double())  # the EDM noise level of any process
        return uncertainty_weighted(out["loss"], self.learned_logvar(sigma)).mean()

    def describe(self) -> str:
        return "diffusion, adaptive weighting (EDM2's learned uncertainty)" if self.weighting is not None else self.name
