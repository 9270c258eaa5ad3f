"""Training methods (config group ``method/``): what one training step optimises, around a ``Diffusion``.

A method is the loss of a step plus the state it keeps between steps (a teacher, a round counter). The
``DiffusionModule`` owns the weights, optimizer and checkpoints and calls its method's hooks; a new method is one
subclass in its own file plus one ``configs/method/<name>.yaml``. Methods hold no registered submodules: a teacher
lives in a ``Frozen`` holder, so it is never in the student's ``state_dict``, optimizer or EMA copy.
"""

from __future__ import annotations

from typing import Any

import torch


class TrainingMethod:
    """A training method's hooks, called by ``DiffusionModule``; the defaults do nothing."""

    name = "base"
    needs_teacher = False

    def setup(self, module: Any, stage: str) -> None:
        """Before training (Lightning's ``setup``, ahead of any checkpoint restore): load teachers, start students."""

    def check(self, process: Any, sampler: Any) -> None:
        """Refuse (ValueError, one line) a process or student sampler this method cannot train; the pre-flight calls
        it too (``config_checks.constructor_problems``)."""

    def refuse_misfit(self, module: Any) -> None:
        """``check`` on the module's process and sampler, as the one-line ConfigError a run stops with."""
        from difflab.utils.errors import ConfigError

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
        """Trainable parameters of the method itself (sCM's loss weighting), optimised with the network's but kept
        out of its state dict: a student stays an ordinary checkpoint. Their state travels in ``state_dict``."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this method exactly (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s output (resume)."""

    def describe(self) -> str:
        """One line for the log: the method and its settings."""
        return self.name


class DiffusionTraining(TrainingMethod):
    """Denoising score matching under the module's ``Diffusion``: the objective's loss at the process's times, with
    conditions dropped for classifier-free guidance (today's training; the default)."""

    name = "diffusion"

    def loss(self, module: Any, batch: dict[str, Any]) -> torch.Tensor:
        return module.diffusion.loss(module, batch)
