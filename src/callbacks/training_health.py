"""Training health scalars: gradient norm, parameter norm, EMA-vs-raw parameter distance, loss spikes.

Every ``every_n_steps`` optimizer steps it logs
- ``health/grad_norm``: global L2 norm of the gradients before clipping (from ``on_before_optimizer_step``);
- ``health/param_norm``: global L2 norm of the trainable parameters;
- ``health/ema_distance``: ||EMA - raw|| / ||raw|| over the parameters (absent without an EMA callback);
- ``health/loss_median``: running median of the training loss over the last ``window`` steps;
- ``health/loss_spikes``: how many steps so far had loss > ``spike_factor`` x the running median (each one also
  logs a warning naming the step).
The learning rate is logged once, as ``train/lr`` by the DiffusionModule.
Losses are buffered as tensors and inspected at logging steps, so there is no per-step device sync.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque

import lightning as L
import torch

from difflab.callbacks.figures import log_scalars
from difflab.ops.ema_weights import ema_provider

log = logging.getLogger(__name__)


@torch.no_grad()
def global_norm(tensors) -> float:
    """L2 norm of all given tensors together (float64 accumulation)."""
    tensors = [t.detach() for t in tensors if t is not None]
    if not tensors:
        return 0.0
    norms = torch._foreach_norm(tensors)
    return float(torch.stack([n.double() for n in norms]).norm())


@torch.no_grad()
def ema_distance(ema_module: torch.nn.Module, raw_module: torch.nn.Module) -> float:
    """||EMA - raw|| / ||raw|| over the trainable parameters shared by name."""
    ema_params = dict(ema_module.named_parameters())
    num = den = None
    for name, p in raw_module.named_parameters():
        q = ema_params.get(name)
        if q is None or not p.requires_grad:
            continue
        d2 = (q.detach() - p.detach()).double().square().sum()  # stays on the device: one sync at the end
        p2 = p.detach().double().square().sum()
        num, den = (d2, p2) if num is None else (num + d2, den + p2)
    if num is None:
        return 0.0
    return float((num / den.clamp(min=1e-30)).sqrt())


class SpikeDetector:
    """Flags values above ``factor`` x the running median of the last ``window`` values (after ``min_history``)."""

    def __init__(self, factor: float = 3.0, window: int = 200, min_history: int = 50):
        if factor <= 1:
            raise ValueError(f"loss spike factor must be > 1; got {factor}")
        self.factor, self.min_history = float(factor), int(min_history)
        self.values: deque[float] = deque(maxlen=int(window))
        self.count = 0

    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def add(self, value: float) -> bool:
        """Record a value; True if it is a spike (the spike itself still enters the window)."""
        spike = len(self.values) >= self.min_history and value > self.factor * self.median()
        self.values.append(value)
        self.count += int(spike)
        return spike


class TrainingHealthCallback(L.Callback):
    """Logs the health scalars above every ``every_n_steps`` optimizer steps (null: the trainer's log_every_n_steps)."""

    def __init__(
        self,
        every_n_steps: int | None = None,
        spike_factor: float = 3.0,
        spike_window: int = 200,
        spike_min_history: int = 50,
    ):
        self.every_n_steps = every_n_steps
        self.spikes = SpikeDetector(spike_factor, spike_window, spike_min_history)
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._grad_norm: float | None = None
        self._last_logged = -1

    def _every(self, trainer) -> int:
        return max(1, int(self.every_n_steps or trainer.log_every_n_steps or 50))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # global_step counts finished steps: this is step global_step + 1 once the optimizer has stepped.
        if (trainer.global_step + 1) % self._every(trainer) == 0:
            self._grad_norm = global_norm([p.grad for p in pl_module.parameters() if p.grad is not None])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):
            self._pending.append((trainer.global_step, loss.detach().float().reshape(())))
        step = trainer.global_step
        if step == self._last_logged or step % self._every(trainer):
            return
        self._last_logged = step
        self._check_spikes(trainer)
        metrics = {
            "health/param_norm": global_norm([p for p in pl_module.parameters() if p.requires_grad]),
            "health/loss_spikes": float(self.spikes.count),
            "health/loss_median": self.spikes.median(),
        }
        if self._grad_norm is not None:
            metrics["health/grad_norm"] = self._grad_norm
            self._grad_norm = None
        provider = ema_provider(trainer)
        copies = provider.whole_copies(pl_module) if provider is not None else {}
        if "ema" in copies:  # a sharded EMA holds no whole copy on this rank: no distance
            metrics["health/ema_distance"] = ema_distance(copies["ema"], copies["raw"])
        log_scalars(trainer, metrics, step)

    def _check_spikes(self, trainer) -> None:
        if not self._pending:
            return
        values = torch.stack([v for _, v in self._pending]).cpu().tolist()  # one device sync per logging step
        steps = [s for s, _ in self._pending]
        self._pending.clear()
        for s, v in zip(steps, values):
            median = self.spikes.median()
            if self.spikes.add(v) and trainer.global_rank == 0:
                log.warning(
                    "loss spike at step %d: loss %.4g > %.1f x running median %.4g (spikes so far: %d)",
                    s,
                    v,
                    self.spikes.factor,
                    median,
                    self.spikes.count,
                )

    def state_dict(self) -> dict:
        return {"spike_count": self.spikes.count, "losses": list(self.spikes.values)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.spikes.count = int(state_dict.get("spike_count", 0))
        self.spikes.values.extend(float(v) for v in state_dict.get("losses", []))
