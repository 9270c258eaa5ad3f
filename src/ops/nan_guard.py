"""Skip optimizer steps whose loss or gradients are not finite, and stop after too many in a row.

A single NaN batch (a corrupt sample, an fp overflow) should cost one step, not the run: ``NonFiniteGuard`` checks
the loss (``on_before_backward``) and the gradient norm (``on_before_optimizer_step``, after DDP's all-reduce) and,
for a bad step, drops every gradient (``grad = None``) so the optimizer leaves weights and moments untouched.
Skipped steps are counted (``train/skipped_steps``) and saved in checkpoints. After ``max_consecutive`` bad steps
in a row (``callbacks.nonfinite_guard.max_consecutive``, default 5) training stops with ``TrainingDivergedError``
(``training diverged: ... at step N; the last good checkpoint is <path>``), which the console prints as one line with
exit status 2. Under fp16 mixed precision the GradScaler already skips overflowing steps; the guard then only counts.

A checkpoint never holds non-finite weights: every save (periodic, ``last.ckpt``, the final one, the one on SIGTERM)
first checks the raw and EMA weights (``on_save_checkpoint``, on every rank, before anything is written) and stops
training with the same error when one is NaN / inf, so ``last.ckpt`` keeps the last good weights. (Weights go
non-finite through a step whose loss and gradients were finite but whose update overflowed, or with the guard's
skipping off; skipped steps leave them untouched.)
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from difflab.ops.fsdp import local
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


def tensors_finite(tensors) -> bool:
    """Every element of every floating-point tensor is finite (the local shard of a DTensor); one host sync per
    device. Used on weights, where a fused norm could overflow fp16 and report a false non-finite."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if torch.is_tensor(t) and t.is_floating_point():
            t = local(t.detach())
            if t.numel() and t.device.type != "meta":
                flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(fs).all()) for fs in flags.values())


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


def diverged(trainer: L.Trainer, what: str) -> TrainingDivergedError:
    """The one-line error that stops a diverging run: what happened, at which step, and the newest checkpoint on
    disk, which holds finite weights (saving non-finite ones is refused)."""
    ckpt = last_checkpoint(trainer)
    where = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written before it"
    return TrainingDivergedError(
        f"training diverged: {what}; {where}; lower model.lr or check the data, then "
        f"resume with ckpt_path=<that checkpoint>"
    )


class NonFiniteGuard(L.Callback):
    """Skip steps with non-finite loss/gradients; raise after ``max_consecutive`` of them in a row (0: never); refuse
    to save non-finite weights."""

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
        log.warning(
            "step %d: non-finite loss or gradients, optimizer step skipped (%d in a row, %d in total)",
            step,
            self.consecutive,
            self.skipped_total,
        )
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise diverged(
                trainer,
                f"{self.consecutive} consecutive steps with non-finite loss or gradients "
                f"({self.skipped_total} skipped in total), stopped at step {step}",
            )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Refuse to save non-finite weights (raw or EMA): training stops and the previous checkpoints stay as they
        are. Runs on every rank (Lightning builds the checkpoint everywhere), so the ranks agree."""
        weights = [
            *pl_module.parameters(),
            *(checkpoint.get("state_dict") or {}).values(),
            *(checkpoint.get("current_model_state") or {}).values(),
        ]
        bad = not tensors_finite(weights)
        if trainer.world_size > 1:  # FSDP: each rank checked its own shards
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise diverged(trainer, f"NaN or inf weights, not saved, at step {trainer.global_step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) and not self.consecutive:
            return  # logged at the logger's cadence (and on every skipped step); self.log costs ~1 ms per call
        pl_module.log(
            "train/skipped_steps", float(self.skipped_total), on_step=True, on_epoch=False, rank_zero_only=True
        )

    def state_dict(self) -> dict:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
