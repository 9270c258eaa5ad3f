"""Exponential moving average of the weights, on top of Lightning's ``WeightAveraging``.

Adds what diffusion training needs over ``EMAWeightAveraging``: decay warm-up, update every N optimizer steps, a fused
(foreach) update, keeping the average on the model's device, and ``ema_module()`` so that callbacks sample from EMA
weights whatever their order in the callback list. Checkpoints keep Lightning's layout: ``state_dict`` holds the EMA
weights, ``current_model_state`` the raw ones.

Under FSDP (``trainer=fsdp``: the module's parameters are DTensor shards) there is no whole-module copy. The average
is one DTensor per parameter and buffer, laid out like the module's own, created after the strategy has sharded the
module (``on_fit_start``); each rank updates its local shards (``torch._foreach_lerp_``, no communication), swaps them
with the module's for validation and copies them in at the end of training. Checkpoints hold them as the sharded
entry ``ema_state_dict`` (written and read by ``torch.distributed.checkpoint``, see ``difflab.ops.fsdp``); the module's
``state_dict`` stays the raw weights. Sampling callbacks need the whole model on the ranks that draw (rank 0 for
figures, every rank for sharded sample metrics), which a sharded forward on rank 0 alone would deadlock: at the steps
where one of them is due (``sampling_callbacks``: their ``every_n_steps`` / ``dense_early`` / ``at_end`` schedule),
every rank takes part in gathering the EMA into an unsharded copy of the module (built in ``setup``, before sharding,
kept on the CPU between uses), which ``ema_module()`` then returns. The callback moves itself to the front of the
callback list so that this copy is fresh before any other callback's hook of the same step runs.
"""
from __future__ import annotations

import copy
import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim.swa_utils import AveragedModel

log = logging.getLogger(__name__)


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """Decay for the next update: ``min(decay, (1 + n) / (10 + n))`` with warm-up, else ``decay``."""
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay


def is_sharding(trainer: L.Trainer | None) -> bool:
    """True under a strategy that shards parameters as DTensors (``trainer=fsdp``: Lightning's ModelParallelStrategy)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def sampling_callbacks(trainer: L.Trainer) -> list[L.Callback]:
    """The trainer's callbacks that sample from ``ema_module()`` on a schedule (figures, grids, sample metrics)."""
    from difflab.callbacks.class_grid import ClassGridCallback
    from difflab.callbacks.figures import DiagnosticCallback
    from difflab.callbacks.video_grid import VideoGridCallback

    kinds = (DiagnosticCallback, ClassGridCallback, VideoGridCallback)
    return [cb for cb in trainer.callbacks if isinstance(cb, kinds) or getattr(cb, "samples_ema_module", False)]


def _sampling_due(callbacks: list, step: int, at_end: bool) -> bool:
    from difflab.callbacks.schedule import is_scheduled

    if at_end:
        return any(getattr(cb, "at_end", False) for cb in callbacks)
    return any(is_scheduled(step, int(getattr(cb, "every_n_steps", 0) or 0), bool(getattr(cb, "dense_early", False)))
               for cb in callbacks)


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
        # sharded mode (trainer=fsdp)
        self.sharded = False
        self._shards: dict[str, torch.Tensor] = {}  # name -> DTensor (parameters) or tensor (buffers)
        self._persistent: set[str] = set()          # names that belong in a state_dict
        self._n_averaged = 0
        self._replica: L.LightningModule | None = None  # unsharded copy holding gathered EMA weights, for sampling
        self._replica_step = -1
        self._samplers: list = []
        self._pending_full_state: dict | None = None
        self._trainer: L.Trainer | None = None

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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage != "fit":
            return
        if not is_sharding(trainer):
            # WeightAveraging.setup without its warning about configure_model: DiffusionModule's only shards under
            # trainer=fsdp and is a no-op here
            if is_overridden("configure_model", pl_module):
                pl_module.configure_model()
            self._average_model = AveragedModel(model=pl_module, device=self._device or pl_module.device,
                                                use_buffers=self._use_buffers, **self._kwargs)
            return
        if self._device is not None:
            from difflab.utils.errors import ConfigError

            raise ConfigError("callbacks.ema.device is not supported under trainer=fsdp: the average is sharded like "
                              "the model")
        self.sharded = True
        self._average_model = None
        trainer.callbacks.remove(self)  # first, so that the sampling copy is gathered before other hooks use it
        trainer.callbacks.insert(0, self)
        self._samplers = sampling_callbacks(trainer)
        needs_copy = trainer.global_rank == 0 or any(getattr(cb, "all_ranks", False) for cb in self._samplers)
        if self._samplers and needs_copy:  # the module is still whole here: Lightning shards it after setup
            self._replica = copy.deepcopy(pl_module).cpu().requires_grad_(False).eval()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.sharded:
            self._init_shards(pl_module)
            return
        # Lightning builds the average in setup(), before the strategy moves the module to its device.
        if self._average_model is not None and self._device is None:
            self._average_model.to(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._replica is not None and self._replica.device.type != "cpu":
            self._replica.cpu()  # the sampling copy lives on the GPU only while callbacks use it

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step_idx = trainer.global_step - 1  # zero-based, as in WeightAveraging
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self._update(pl_module)
            self._latest_update_step = trainer.global_step
            self.num_updates += 1
        if self.sharded and self._replica_step != trainer.global_step \
                and _sampling_due(self._samplers, trainer.global_step, at_end=False):
            self.gather_replica(trainer)

    def _update(self, pl_module: L.LightningModule) -> None:
        """One EMA step. Same result as ``AveragedModel.update_parameters`` but with the tensor lists built once:
        walking the module tree and regrouping tensors every step cost 4x the lerp itself (BENCHMARKS.md)."""
        if self.sharded:
            self._update_shards(pl_module)
            return
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

    # ------------------------------------------------------------------ sharded mode (trainer=fsdp)
    @staticmethod
    def _named_tensors(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The module's parameters (DTensor shards) and buffers by name, with every FSDP unit resharded first."""
        from difflab.ops.fsdp import reshard

        reshard(pl_module)
        return {**dict(pl_module.named_parameters()), **dict(pl_module.named_buffers())}

    def _init_shards(self, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            self._shards = {n: t.detach().clone() for n, t in self._named_tensors(pl_module).items()}
        self._persistent = set(pl_module.state_dict().keys()) & self._shards.keys()
        self._n_averaged = 0
        if self._pending_full_state is not None:
            self._load_full_into_shards(self._pending_full_state)
            self._n_averaged = 1  # an initialised average is not overwritten by the first update
            self._pending_full_state = None

    def _local_pairs(self, pl_module: L.LightningModule) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(EMA, module) local shards, in the same order; views: writing into them writes the shards."""
        from difflab.ops.fsdp import local

        current = self._named_tensors(pl_module)
        if current.keys() != self._shards.keys():
            raise RuntimeError("EMA: the module's parameters changed names since the average was created")
        names = list(self._shards)
        return [local(self._shards[n]).detach() for n in names], [local(current[n]).detach() for n in names]

    def _update_shards(self, pl_module: L.LightningModule) -> None:
        avg, cur = self._local_pairs(pl_module)
        with torch.no_grad():
            if self._n_averaged == 0:  # the first update copies (as AveragedModel does)
                torch._foreach_copy_(avg, cur)
            else:
                self._lerp(avg, cur, None)
        self._n_averaged += 1

    def _swap_models(self, pl_module) -> None:
        if self.sharded:
            avg, cur = self._local_pairs(pl_module)
            with torch.no_grad():
                for a, c in zip(avg, cur):
                    tmp = a.clone()
                    a.copy_(c)
                    c.copy_(tmp)
        else:
            super()._swap_models(pl_module)
        self.swapped = not self.swapped

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not self.sharded:
            return super().on_validation_epoch_start(trainer, pl_module)
        if self._shards:
            self._swap_models(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.sharded:
            return super().on_validation_epoch_end(trainer, pl_module)
        if self._shards:
            self._swap_models(pl_module)

    def gather_replica(self, trainer: L.Trainer | None = None) -> L.LightningModule | None:
        """Gather the EMA shards into the unsharded sampling copy (on the training device until the next batch).
        A collective: every rank must call it, at the same point. Returns the copy (None on ranks without one)."""
        from difflab.ops.fsdp import full

        trainer = trainer or self._trainer
        replica = self._replica
        if replica is not None:
            replica.to(trainer.strategy.root_device)
            own = {**dict(replica.named_parameters()), **dict(replica.named_buffers())}
        with torch.no_grad():
            for name, shard in self._shards.items():  # same order on every rank
                whole = full(shard)
                if replica is not None and name in own:
                    own[name].copy_(whole)
        self._replica_step = trainer.global_step
        return replica

    def load_full_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Initialise the average from whole (unsharded) weights, e.g. ``init_from``'s EMA. Before ``on_fit_start``
        under FSDP (the shards do not exist yet) it is applied when they are created."""
        if not self.sharded:
            self._average_model.module.load_state_dict(state_dict, strict=False)
            self._average_model.n_averaged.fill_(max(1, int(self._average_model.n_averaged)))
        elif not self._shards:
            self._pending_full_state = dict(state_dict)
        else:
            self._load_full_into_shards(state_dict)
            self._n_averaged = max(1, self._n_averaged)

    def _load_full_into_shards(self, state_dict: dict[str, torch.Tensor]) -> None:
        from difflab.ops.fsdp import local, shard_like

        with torch.no_grad():
            for name, shard in self._shards.items():
                if name in state_dict:
                    local(shard).copy_(shard_like(state_dict[name], shard))

    # ------------------------------------------------------------------ end of training, checkpoints
    def on_train_end(self, trainer, pl_module) -> None:
        # Keep the raw weights: a checkpoint written after this point must still resume from them, not from EMA.
        if self.sharded:
            from difflab.ops.fsdp import local

            named = self._named_tensors(pl_module)
            self._raw_state_at_end = {k: named[k].detach().clone() for k in self._persistent}
            with torch.no_grad():
                for name, shard in self._shards.items():
                    local(named[name]).copy_(local(shard))
            self.swapped = True  # the module now holds the EMA weights
            if self._replica_step != trainer.global_step and _sampling_due(self._samplers, trainer.global_step, True):
                self.gather_replica(trainer)
            return
        self._raw_state_at_end = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)
        self.swapped = True  # the module now holds the EMA weights

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.sharded:
            # state_dict stays the raw weights (what the strategy loads into the module on resume); the EMA shards
            # go to the sharded entry ema_state_dict
            raw = getattr(self, "_raw_state_at_end", None)
            ema = {n: t for n, t in self._shards.items() if n in self._persistent}
            if raw is not None:
                checkpoint["state_dict"] = raw
            elif self.swapped:  # saved during validation: the module holds the EMA, the average the raw weights
                checkpoint["state_dict"], ema = ema, {n: t.detach().clone() for n, t in
                                                      self._named_tensors(pl_module).items() if n in self._persistent}
            checkpoint["ema_state_dict"] = ema
            return
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        raw = getattr(self, "_raw_state_at_end", None)
        if raw is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = raw

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if not self.sharded:
            return super().on_load_checkpoint(trainer, pl_module, checkpoint)
        import torch.distributed.checkpoint as dcp

        from difflab.ops.fsdp import SHARDS_DIR_KEY

        shards_dir = checkpoint.get(SHARDS_DIR_KEY)
        stored = set()
        if shards_dir is not None:
            from difflab.ops.fsdp import shard_reader

            reader = shard_reader(shards_dir)
            stored = {k.partition(".")[2] for k in reader.read_metadata().state_dict_metadata
                      if k.startswith("ema_state_dict.")}
        if stored:
            targets = {n: t for n, t in self._shards.items() if n in stored}
            dcp.load({"ema_state_dict": targets}, storage_reader=reader)  # in place, every rank its shards
        else:  # a checkpoint of a run without EMA: start the average from the restored weights
            log.warning("the checkpoint holds no EMA weights: the EMA starts from the restored raw weights")
            avg, cur = self._local_pairs(pl_module)
            with torch.no_grad():
                torch._foreach_copy_(avg, cur)

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "num_updates": self.num_updates}
        if self.sharded:
            state["n_averaged"] = self._n_averaged
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.num_updates = state_dict.get("num_updates", 0)
        if self.sharded:
            self._n_averaged = int(state_dict.get("n_averaged", self.num_updates))

    def average_module(self, pl_module: L.LightningModule) -> L.LightningModule:
        """The module that currently holds the EMA weights (under FSDP: the gathered, unsharded copy)."""
        if self.sharded:
            return self._sampling_copy()
        if self._average_model is None or self.swapped:
            return pl_module
        return self._average_model.module

    def _sampling_copy(self) -> L.LightningModule:
        step = self._trainer.global_step if self._trainer is not None else None
        if self._replica is None or self._replica_step != step:
            have = "no sampling copy on this rank" if self._replica is None else \
                f"the sampling copy was gathered at step {self._replica_step}"
            raise RuntimeError(f"EMA under FSDP: {have}, sampling asked at step {step}. The EMA weights are sharded; "
                               "they are gathered (on all ranks) at the schedule of the sampling callbacks "
                               "(every_n_steps / dense_early / at_end). Elsewhere call ema.gather_replica(trainer) "
                               "on every rank first.")
        return self._replica


def find_ema(trainer: L.Trainer) -> EMA | None:
    """The trainer's EMA callback, if any."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)


def ema_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The EMA-weighted module to sample from (the module itself when EMA is off), independent of hook order.
    Under FSDP: the unsharded copy the EMA callback gathered for this step (see the module docstring)."""
    ema = find_ema(trainer)
    return pl_module if ema is None else ema.average_module(pl_module)
