"""Exponential moving average of the weights, on top of Lightning's ``WeightAveraging``.

Adds what diffusion training needs over ``EMAWeightAveraging``: decay warm-up, update every N optimizer steps, a fused
(foreach) update, keeping the average on the model's device, and ``ema_module()`` so that callbacks sample from EMA
weights whatever their order in the callback list. Checkpoints keep Lightning's layout: ``state_dict`` holds the EMA
weights, ``current_model_state`` the raw ones.
"""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """Decay for the next update: ``min(decay, (1 + n) / (10 + n))`` with warm-up, else ``decay``."""
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay


class EMA(WeightAveraging):
    """EMA of all parameters and buffers, updated every ``update_every`` optimizer steps from ``start_step`` on."""

    def __init__(self, decay: float = 0.999, update_every: int = 1, start_step: int = 0, warmup: bool = True,
                 device: str | None = None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1]; got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA update_every must be >= 1; got {update_every}")
        super().__init__(device=device, use_buffers=True, multi_avg_fn=self._lerp)
        self.decay, self.update_every, self.start_step, self.warmup = decay, update_every, start_step, warmup
        self.num_updates = 0
        self.swapped = False

    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _n_averaged) -> None:
        weight = 1.0 - ema_decay(self.decay, self.num_updates, self.warmup)
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step and (step_idx - self.start_step) % self.update_every == 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning builds the average in setup(), before the strategy moves the module to its device.
        if self._average_model is not None and self._device is None:
            self._average_model.to(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step_idx = trainer.global_step - 1  # zero-based, as in WeightAveraging
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self._update(pl_module)
            self._latest_update_step = trainer.global_step
            self.num_updates += 1

    def _update(self, pl_module: L.LightningModule) -> None:
        """One EMA step. Same result as ``AveragedModel.update_parameters`` but with the tensor lists built once:
        walking the module tree and regrouping tensors every step cost 4x the lerp itself (BENCHMARKS.md)."""
        avg = self._average_model
        pairs = self._tensor_pairs(pl_module)
        if pairs is None or int(avg.n_averaged) == 0:  # first update copies; EMA on another device converts
            avg.update_parameters(pl_module)
            return
        with torch.no_grad():
            self._lerp(*pairs, None)
        avg.n_averaged += 1

    def _tensor_pairs(self, pl_module: L.LightningModule):
        """(averaged, current) lists of parameters and buffers, cached per module; None when the two live on
        different devices (then AveragedModel's converting path is used). The key holds the first parameters'
        storage addresses, so moving either module (``.to()``) rebuilds the lists."""
        first = (next(pl_module.parameters(), None), next(self._average_model.module.parameters(), None))
        key = (id(pl_module), id(self._average_model), *(p.data_ptr() if p is not None else 0 for p in first))
        if getattr(self, "_pairs_key", None) != key:
            avg_m = self._average_model.module
            avg_t = [t.detach() for t in (*avg_m.parameters(), *avg_m.buffers())]
            cur_t = [t.detach() for t in (*pl_module.parameters(), *pl_module.buffers())]
            same = len(avg_t) == len(cur_t) and all(a.device == c.device for a, c in zip(avg_t, cur_t))
            self._pairs, self._pairs_key = ((avg_t, cur_t) if same else None), key
        return self._pairs

    def _swap_models(self, pl_module) -> None:
        super()._swap_models(pl_module)
        self.swapped = not self.swapped

    def on_train_end(self, trainer, pl_module) -> None:
        # Keep the raw weights: a checkpoint written after this point must still resume from them, not from EMA.
        self._raw_state_at_end = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)
        self.swapped = True  # the module now holds the EMA weights

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        raw = getattr(self, "_raw_state_at_end", None)
        if raw is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = raw

    def state_dict(self) -> dict:
        return {**super().state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.num_updates = state_dict.get("num_updates", 0)

    def average_module(self, pl_module: L.LightningModule) -> L.LightningModule:
        """The module that currently holds the EMA weights."""
        if self._average_model is None or self.swapped:
            return pl_module
        return self._average_model.module


def find_ema(trainer: L.Trainer) -> EMA | None:
    """The trainer's EMA callback, if any."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)


def ema_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The EMA-weighted module to sample from (the module itself when EMA is off), independent of hook order."""
    ema = find_ema(trainer)
    return pl_module if ema is None else ema.average_module(pl_module)
