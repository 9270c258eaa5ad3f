"""Exponential moving average of the weights, on top of Lightning's ``WeightAveraging``.

Adds what diffusion training needs over ``EMAWeightAveraging``: decay warm-up, update every N optimizer steps, a fused
(foreach) update and keeping the average on the model's device. The average lives in a ``ShadowStore``
(``difflab.callbacks.ema_shadow``): the whole-module ``AveragedShadow``, or under ``trainer=fsdp`` the sharded
``difflab.ops.fsdp_ema.ShardedShadow``, chosen in ``setup``. Checkpoints keep Lightning's layout: ``state_dict``
holds the EMA weights, ``current_model_state`` the raw ones (sharded: see ``difflab.ops.fsdp_ema``).

The callback is the trainer's EMA provider (``difflab.ops.ema_weights``): sampling callbacks enter
``ema_weights(trainer, pl_module)`` on every rank, which brings the average up to date for the step (whatever the
callback order) and, under FSDP, gathers it into a whole copy of the module.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities.model_helpers import is_overridden

from difflab.callbacks.ema_shadow import AveragedShadow, ShadowStore
from difflab.diffusion.posthoc_ema import SIGMA_REL_MAX, power_ema_beta, sigma_rel_to_gamma
from difflab.ops.ema_weights import ema_module, ema_weights, prepare_ema_weights  # noqa: F401 - the public seam
from difflab.ops.fsdp import is_sharding
from difflab.ops.fsdp_ema import ShardedShadow
from difflab.utils.errors import ConfigError


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """Decay for the next update: ``min(decay, (1 + n) / (10 + n))`` with warm-up, else ``decay``."""
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay


def ema_profile(decay: float | None, sigma_rel: float | None) -> tuple[float | None, float | None]:
    """``(decay, gamma)`` from exactly one of a constant decay and a power-function length (EDM2's ``sigma_rel``):
    a constant decay (once warmed up) averages a fixed number of updates, a power-function EMA a fixed fraction of
    all of them, so its length follows the run's on a fast machine or a slow one."""
    if (decay is None) == (sigma_rel is None):
        raise ConfigError(
            f"callbacks.ema: give exactly one of decay (constant, e.g. 0.999) or sigma_rel (power-function length "
            f"relative to the run, e.g. 0.1) and set the other to null; got decay={decay}, sigma_rel={sigma_rel}"
        )
    if decay is not None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"callbacks.ema.decay={decay}: EMA decay must be in [0, 1]")
        return float(decay), None
    if not 0.0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f"callbacks.ema.sigma_rel={sigma_rel}: must be in (0, {SIGMA_REL_MAX:.3f}] (EDM2: 0.05-0.2)")
    return None, sigma_rel_to_gamma(float(sigma_rel))


def keeps_sampling_copy(trainer: L.Trainer) -> bool:
    """Whether this rank needs a whole copy of the sharded average: rank 0 draws figures, and every rank does when a
    sampling callback shards its work over the ranks (``all_ranks``)."""
    samplers = [cb for cb in trainer.callbacks if getattr(cb, "samples_ema_weights", False)]
    return bool(samplers) and (trainer.global_rank == 0 or any(getattr(cb, "all_ranks", False) for cb in samplers))


class EMA(WeightAveraging):
    """EMA of all parameters and buffers, updated every ``update_every`` optimizer steps from ``start_step`` on: a
    constant ``decay`` (with an optional warm-up) or, with ``sigma_rel`` (and ``decay=None``), a power-function EMA
    whose update ``n`` (from 1) decays by ``(1 - 1/n)^(gamma + 1)`` (EDM2 Sec. 3.1)."""

    provides_ema_weights = True

    def __init__(
        self,
        decay: float | None = 0.999,
        update_every: int = 1,
        start_step: int = 0,
        warmup: bool = True,
        device: str | None = None,
        sigma_rel: float | None = None,
    ):
        decay, self.gamma = ema_profile(decay, sigma_rel)
        self.sigma_rel = sigma_rel
        if update_every < 1:
            raise ValueError(f"EMA update_every must be >= 1; got {update_every}")
        super().__init__(device=device, use_buffers=True, multi_avg_fn=self._lerp)
        self.decay, self.update_every, self.start_step, self.warmup = decay, update_every, start_step, warmup
        self.num_updates = 0
        self.swapped = False
        self.store: ShadowStore | None = None
        self._raw_state_at_end: dict | None = None
        self._trainer: L.Trainer | None = None

    def next_decay(self) -> float:
        """The decay of the coming update (the ``num_updates + 1``-th)."""
        if self.gamma is not None:
            return power_ema_beta(self.num_updates + 1, self.gamma)
        return ema_decay(self.decay, self.num_updates, self.warmup)

    @property
    def sharded(self) -> bool:
        """True when the average is sharded like the module (``trainer=fsdp``)."""
        return self.store is not None and self.store.sharded

    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _n_averaged) -> None:
        weight = 1.0 - self.next_decay()
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return (
            step_idx is not None
            and step_idx >= self.start_step
            and (step_idx - self.start_step) % self.update_every == 0
        )

    # ------------------------------------------------------------------ training
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage != "fit":
            return
        if is_sharding(trainer):
            if self._device is not None:
                raise ConfigError(
                    "callbacks.ema.device is not supported under trainer=fsdp: the average is sharded like the model"
                )
            self.store = ShardedShadow(pl_module, keep_copy=keeps_sampling_copy(trainer))
        else:
            # as WeightAveraging.setup, without its warning about configure_model: DiffusionModule's only shards
            # under trainer=fsdp and is a no-op here
            if is_overridden("configure_model", pl_module):
                pl_module.configure_model()
            self.store = AveragedShadow(pl_module, self._device, self._lerp)
        self._average_model = getattr(self.store, "averaged", None)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.store is not None:
            self.store.start(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.store is not None:
            self.store.release()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.update_for_step(trainer, pl_module)

    def update_for_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Apply this optimizer step's update if it is due and not applied yet (idempotent within a step)."""
        step_idx = trainer.global_step - 1  # zero-based, as in WeightAveraging
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self.store.update(pl_module, self._lerp)
            self._latest_update_step = trainer.global_step
            self.num_updates += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        return None  # updates follow optimizer steps only (should_update is False for epochs)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.store is not None:
            self.store.swap(pl_module)
            self.swapped = not self.swapped

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.store is not None:
            self.store.swap(pl_module)
            self.swapped = not self.swapped

    def on_train_end(self, trainer, pl_module) -> None:
        # Keep the raw weights: a checkpoint written after this point must still resume from them, not from EMA.
        self._raw_state_at_end = self.store.copy_into(pl_module)
        self.swapped = True  # the module now holds the EMA weights

    # ------------------------------------------------------------------ the EMA provider (difflab.ops.ema_weights)
    def prepare_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Bring the average up to date for this step and, when sharded, gather it (every rank calls this)."""
        if self.store is None:
            return
        if not self.swapped and not trainer.sanity_checking:
            self.update_for_step(trainer, pl_module)
        self.store.prepare(trainer)

    def average_module(self, pl_module: L.LightningModule) -> L.LightningModule:
        """The module that currently holds the EMA weights (under FSDP: the gathered, unsharded copy)."""
        if self.store is None:
            return pl_module
        step = self._trainer.global_step if self._trainer is not None else None
        return self.store.average_module(pl_module, self.swapped, step)

    def whole_copies(self, pl_module: L.LightningModule) -> dict:
        """``{"raw": module, "ema": module}``: the whole modules this rank holds (only ``raw`` when sharded)."""
        return {"raw": pl_module} if self.store is None else self.store.whole_copies(pl_module, self.swapped)

    def load_full_state(
        self, state_dict: dict[str, torch.Tensor], strict: bool = True, source: str = "", num_updates: int | None = None
    ) -> None:
        """Start the average from whole (unsharded) weights, e.g. ``init_from``'s EMA; with ``num_updates`` the
        decay continues where the source run left it (no new warm-up)."""
        if self.store is None:
            return
        self.store.load_full(state_dict, strict, source)
        if num_updates is not None:  # the decay's counter is the callback's, sharded store or not
            self.num_updates = num_updates

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.store is not None:
            self.store.save(checkpoint, pl_module, self.swapped, self._raw_state_at_end)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.store is not None:
            self.store.load(checkpoint, pl_module)

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "num_updates": self.num_updates}
        if self.store is not None:
            state.update(self.store.state())
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.num_updates = state_dict.get("num_updates", 0)
        if self.store is not None:
            self.store.load_state(state_dict, self.num_updates)


def find_ema(trainer: L.Trainer) -> EMA | None:
    """The trainer's EMA callback, if any."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)
