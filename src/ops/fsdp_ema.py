"""The EMA's sharded store (``trainer=fsdp``): one DTensor per parameter and buffer, laid out like the module's own.

Created once the strategy has sharded the module (``start``); each rank updates its local shards
(``torch._foreach_lerp_``, no communication), swaps them with the module's for validation and copies them in at the
end of training. Checkpoints hold them as the sharded entry ``ema_state_dict`` (written and read by
``torch.distributed.checkpoint``, see ``difflab.ops.fsdp``); the module's ``state_dict`` stays the raw weights.

Sampling needs whole weights on the ranks that draw: ``prepare`` (called on every rank at the same point, through
``difflab.ops.ema_weights``) gathers the shards into an unsharded copy of the module, built before sharding and kept
on the CPU between uses, once per step; ``average_module`` returns that copy and refuses one gathered at another step.
"""

from __future__ import annotations

import copy
import logging

import lightning as L
import torch
from torch import nn

from difflab.ops.fsdp import SHARDS_DIR_KEY, full, local, reshard, shard_like, shard_reader

log = logging.getLogger(__name__)


def named_tensors(pl_module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters (DTensor shards) and buffers by name, with every FSDP unit resharded first."""
    reshard(pl_module)
    return {**dict(pl_module.named_parameters()), **dict(pl_module.named_buffers())}


class ShardedShadow:
    """The average as sharded tensors beside an FSDP2 module, plus an optional whole copy for sampling."""

    sharded = True

    def __init__(self, pl_module: L.LightningModule | None = None, keep_copy: bool = False):
        self.shards: dict[str, torch.Tensor] = {}  # name -> DTensor (parameters) or tensor (buffers)
        self.persistent: set[str] = set()  # names that belong in a state_dict
        self.n_averaged = 0
        self.pending_full: dict | None = None
        # the module is still whole here (Lightning shards it after setup): copy it for sampling
        self.replica = copy.deepcopy(pl_module).cpu().requires_grad_(False).eval() if keep_copy else None
        self.replica_step = -1

    def start(self, pl_module):
        with torch.no_grad():
            self.shards = {n: t.detach().clone() for n, t in named_tensors(pl_module).items()}
        self.persistent = set(pl_module.state_dict().keys()) & self.shards.keys()
        self.n_averaged = 0
        if self.pending_full is not None:
            self._load_whole(self.pending_full)
            self.n_averaged = 1  # an initialised average is not overwritten by the first update
            self.pending_full = None

    def local_pairs(self, pl_module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(EMA, module) local shards, in the same order; views: writing into them writes the shards."""
        current = named_tensors(pl_module)
        if current.keys() != self.shards.keys():
            raise RuntimeError("EMA: the module's parameters changed names since the average was created")
        names = list(self.shards)
        return [local(self.shards[n]).detach() for n in names], [local(current[n]).detach() for n in names]

    def update(self, pl_module, lerp):
        avg, cur = self.local_pairs(pl_module)
        with torch.no_grad():
            if self.n_averaged == 0:  # the first update copies (as AveragedModel does)
                torch._foreach_copy_(avg, cur)
            else:
                lerp(avg, cur, None)
        self.n_averaged += 1

    def swap(self, pl_module):
        if not self.shards:
            return
        avg, cur = self.local_pairs(pl_module)
        with torch.no_grad():
            for a, c in zip(avg, cur):
                tmp = a.clone()
                a.copy_(c)
                c.copy_(tmp)

    def copy_into(self, pl_module):
        named = named_tensors(pl_module)
        raw = {k: named[k].detach().clone() for k in self.persistent}
        with torch.no_grad():
            for name, shard in self.shards.items():
                local(named[name]).copy_(local(shard))
        return raw

    def save(self, checkpoint, pl_module, swapped, raw_at_end):
        # state_dict stays the raw weights (what the strategy loads into the module on resume); the EMA shards go
        # to the sharded entry ema_state_dict
        ema = {n: t for n, t in self.shards.items() if n in self.persistent}
        if raw_at_end is not None:
            checkpoint["state_dict"] = raw_at_end
        elif swapped:  # saved during validation: the module holds the EMA, the average the raw weights
            checkpoint["state_dict"], ema = (
                ema,
                {n: t.detach().clone() for n, t in named_tensors(pl_module).items() if n in self.persistent},
            )
        checkpoint["ema_state_dict"] = ema

    def load(self, checkpoint, pl_module):
        import torch.distributed.checkpoint as dcp

        shards_dir = checkpoint.get(SHARDS_DIR_KEY)
        stored = set()
        if shards_dir is not None:
            reader = shard_reader(shards_dir)
            stored = {
                k.partition(".")[2]
                for k in reader.read_metadata().state_dict_metadata
                if k.startswith("ema_state_dict.")
            }
        if stored:
            targets = {n: t for n, t in self.shards.items() if n in stored}
            dcp.load({"ema_state_dict": targets}, storage_reader=reader)  # in place, every rank its shards
        else:  # a checkpoint of a run without EMA: start the average from the restored weights
            log.warning("the checkpoint holds no EMA weights: the EMA starts from the restored raw weights")
            avg, cur = self.local_pairs(pl_module)
            with torch.no_grad():
                torch._foreach_copy_(avg, cur)

    def load_full(self, state_dict, strict, source):
        """Before ``start`` (the shards do not exist yet) the weights are applied when they are created."""
        if not self.shards:
            self.pending_full = dict(state_dict)
            return
        self._load_whole(state_dict)
        self.n_averaged = max(1, self.n_averaged)

    def _load_whole(self, state_dict):
        with torch.no_grad():
            for name, shard in self.shards.items():
                if name in state_dict:
                    local(shard).copy_(shard_like(state_dict[name], shard))

    def prepare(self, trainer):
        """Gather the shards into the sampling copy, once per step; a collective: every rank calls it together."""
        if self.replica_step == trainer.global_step:
            return
        replica = self.replica
        if replica is not None:
            replica.to(trainer.strategy.root_device)
            own = {**dict(replica.named_parameters()), **dict(replica.named_buffers())}
        with torch.no_grad():
            for name, shard in self.shards.items():  # same order on every rank
                whole = full(shard)
                if replica is not None and name in own:
                    own[name].copy_(whole)
        self.replica_step = trainer.global_step

    def release(self):
        if self.replica is not None and self.replica.device.type != "cpu":
            self.replica.cpu()  # the sampling copy lives on the accelerator only while callbacks use it

    def average_module(self, pl_module, swapped, step):
        if self.replica is None or self.replica_step != step:
            have = (
                "no sampling copy on this rank"
                if self.replica is None
                else f"the sampling copy was gathered at step {self.replica_step}"
            )
            raise RuntimeError(
                f"EMA under FSDP: {have}, sampling asked at step {step}. The EMA weights are "
                "sharded: every rank gathers them together through "
                "difflab.ops.ema_weights.ema_weights(trainer, pl_module) before sampling."
            )
        return self.replica

    def whole_copies(self, pl_module, swapped):
        return {"raw": pl_module}

    def state(self):
        return {"n_averaged": self.n_averaged}

    def load_state(self, state, num_updates):
        self.n_averaged = int(state.get("n_averaged", num_updates))
