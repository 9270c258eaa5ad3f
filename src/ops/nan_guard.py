"""Skip optimizer steps whose loss or gradients are not finite, and stop after too many in a row.

A single NaN batch (a corrupt sample, an fp overflow) should cost one step, not the run: ``NonFiniteGuard`` checks
the loss (``on_before_backward``) and the gradient norm (``on_before_optimizer_step``, after DDP's all-reduce) and,
for a bad step, drops every gradient (``grad = None``) so the optimizer leaves weights and moments untouched.
Skipped steps are counted (``train/skipped_steps``) and saved in checkpoints. After ``max_consecutive`` bad steps
in a row training stops with ``TrainingDivergedError`` naming the step and the last good checkpoint.
Under fp16 mixed precision the GradScaler already skips overflowing steps; the guard then only counts.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from difflab.utils.errors import DifflabError

log = logging.getLogger(__name__)


class TrainingDivergedError(DifflabError):
    """Too many consecutive optimizer steps with non-finite loss or gradients."""


def grads_finite_tensor(params) -> torch.Tensor:
    """0-d bool tensor: every existing gradient is finite (fused norms, no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    norms = torch._foreach_norm(grads)
    if any(n.dtype != norms[0].dtype for n in norms):
        norms = [n.float() for n in norms]
    return torch.isfinite(torch.stack(norms).sum())


def last_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint this run has written (ModelCheckpoint's last / best path, else the newest *.ckpt)."""
    cb = trainer.checkpoint_callback
    for p in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")):
        if p and Path(p).is_file():
            return str(p)
    dirpath = getattr(cb, "dirpath", None)
    if dirpath and Path(dirpath).is_dir():
        ckpts = sorted(Path(dirpath).glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if ckpts:
            return str(ckpts[-1])
    return None


class NonFiniteGuard(L.Callback):
    """Skip steps with non-finite loss/gradients; raise after ``max_consecutive`` of them in a row (0: never)."""

    def __init__(self, max_consecutive: int = 5, check_loss: bool = True):
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0; got {max_consecutive}")
        self.max_consecutive, self.check_loss = max_consecutive, check_loss
        self.skipped_total = 0
        self.consecutive = 0
        self._loss_finite: torch.Tensor | None = None  # AND over micro-batches, kept on device until the step
        self.skipped_steps: list[int] = []  # global steps skipped in this process (for inspection)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if self.check_loss:
            # AND over micro-batches when gradients are accumulated; reset after each optimizer step
            ok = torch.isfinite(loss.detach()).all()
            self._loss_finite = ok if self._loss_finite is None else self._loss_finite & ok

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        ok = grads_finite_tensor(params)
        if self._loss_finite is not None:
            ok = ok.to(self._loss_finite.device) & self._loss_finite
        bad = not bool(ok)  # the one host sync per optimizer step
        self._loss_finite = None
        if trainer.world_size > 1:  # grads are all-reduced already; the loss is per rank: agree on the decision
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped_total += 1
        step = trainer.global_step
        self.skipped_steps.append(step)
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            for p in params:  # the optimizer skips parameters without gradients: weights and moments stay as they are
                p.grad = None
        log.warning("step %d: non-finite loss or gradients, optimizer step skipped (%d in a row, %d in total)",
                    step, self.consecutive, self.skipped_total)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            ckpt = last_checkpoint(trainer)
            raise TrainingDivergedError(
                f"training stopped at step {step}: {self.consecutive} consecutive steps with non-finite loss or "
                f"gradients ({self.skipped_total} skipped in total); last good checkpoint: "
                f"{ckpt or 'none written yet'}. Lower model.lr, check the data, then resume with ckpt_path=<that file>")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) and not self.consecutive:
            return  # logged at the logger's cadence (and on every skipped step); self.log costs ~1 ms per call
        pl_module.log("train/skipped_steps", float(self.skipped_total), on_step=True, on_epoch=False,
                      rank_zero_only=True)

    def state_dict(self) -> dict:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
