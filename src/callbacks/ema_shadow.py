"""Where the EMA callback keeps its average: the storage interface and the plain (whole-module) store.

``difflab.callbacks.ema.EMA`` holds one ``ShadowStore`` and never asks which kind: ``AveragedShadow`` here (an
``AveragedModel`` copy of the whole module, DDP and single device) or ``difflab.ops.fsdp_ema.ShardedShadow``
(one DTensor per parameter, ``trainer=fsdp``). Checkpoints of the plain store keep Lightning's ``WeightAveraging``
layout: ``state_dict`` = EMA, ``current_model_state`` = raw, ``averaging_state`` = the average's counters.
"""

from __future__ import annotations

import logging
from copy import deepcopy
from typing import Callable, Protocol

import lightning as L
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from difflab.checkpoints import load_state_dict_checked

log = logging.getLogger(__name__)

Lerp = Callable[[list, list, object], None]


class ShadowStore(Protocol):
    """The EMA's storage: create, update, swap, save and load the average, and hand out a module holding it."""

    sharded: bool

    def start(self, pl_module: L.LightningModule) -> None:
        """Training starts: the module is on its device (and sharded, if it is going to be)."""

    def update(self, pl_module: L.LightningModule, lerp: Lerp) -> None:
        """One EMA step towards the module's current weights (the first one copies them)."""

    def swap(self, pl_module: L.LightningModule) -> None:
        """Exchange the average with the module's weights (validation runs on the EMA)."""

    def copy_into(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """Put the average into the module at the end of training; returns the raw state it replaced."""

    def save(self, checkpoint: dict, pl_module: L.LightningModule, swapped: bool, raw_at_end: dict | None) -> None:
        """Write the average (and the raw weights) into a checkpoint being saved."""

    def load(self, checkpoint: dict, pl_module: L.LightningModule) -> None:
        """Restore the average (and the raw weights) from a checkpoint being resumed."""

    def load_full(self, state_dict: dict[str, torch.Tensor], strict: bool, source: str) -> None:
        """Start the average from whole (unsharded) weights, e.g. ``init_from``'s EMA."""

    def prepare(self, trainer: L.Trainer) -> None:
        """Make ``average_module`` valid for this step (a collective for sharded stores)."""

    def release(self) -> None:
        """A training batch starts: free what ``prepare`` holds on the accelerator."""

    def average_module(self, pl_module: L.LightningModule, swapped: bool, step: int | None) -> nn.Module:
        """The module holding the EMA weights now."""

    def whole_copies(self, pl_module: L.LightningModule, swapped: bool) -> dict[str, nn.Module]:
        """``{"raw": module, "ema": module}`` of the whole modules this rank holds (``raw`` only when sharded)."""

    def state(self) -> dict:
        """Store counters for the callback's ``state_dict``."""

    def load_state(self, state: dict, num_updates: int) -> None:
        """Restore ``state()``."""


def _pairs(a: nn.Module, b: nn.Module):
    """(a tensor, b tensor) over parameters then buffers, in module order."""
    return zip((*a.parameters(), *a.buffers()), (*b.parameters(), *b.buffers()))


class AveragedShadow:
    """The average as an ``AveragedModel`` copy of the whole module (parameters and buffers)."""

    sharded = False

    def __init__(self, pl_module: L.LightningModule, device: torch.device | str | None, multi_avg_fn: Lerp):
        self.averaged = AveragedModel(
            model=pl_module, device=device or pl_module.device, use_buffers=True, multi_avg_fn=multi_avg_fn
        )
        self.follow_module_device = device is None
        self._pairs_key = None
        self._pairs = None

    def start(self, pl_module):
        if self.follow_module_device:  # built in setup(), before the strategy moved the module to its device
            self.averaged.to(pl_module.device)

    def _tensor_pairs(self, pl_module):
        """(averaged, current) lists of parameters and buffers, cached per module; None when the two live on
        different devices (then AveragedModel's converting path is used). The key holds the first parameters'
        storage addresses, so moving either module (``.to()``) rebuilds the lists."""
        first = (next(pl_module.parameters(), None), next(self.averaged.module.parameters(), None))
        key = (id(pl_module), id(self.averaged), *(p.data_ptr() if p is not None else 0 for p in first))
        if self._pairs_key != key:
            avg_m = self.averaged.module
            avg_t = [t.detach() for t in (*avg_m.parameters(), *avg_m.buffers())]
            cur_t = [t.detach() for t in (*pl_module.parameters(), *pl_module.buffers())]
            same = len(avg_t) == len(cur_t) and all(a.device == c.device for a, c in zip(avg_t, cur_t))
            self._pairs, self._pairs_key = ((avg_t, cur_t) if same else None), key
        return self._pairs

    def update(self, pl_module, lerp):
        """Same result as ``AveragedModel.update_parameters`` with the tensor lists built once: walking the module
        tree and regrouping tensors every step cost 4x the lerp itself (BENCHMARKS.md)."""
        pairs = self._tensor_pairs(pl_module)
        if pairs is None or int(self.averaged.n_averaged) == 0:  # first update copies; another device converts
            self.averaged.update_parameters(pl_module)
            return
        with torch.no_grad():
            lerp(*pairs, None)
        self.averaged.n_averaged += 1

    def swap(self, pl_module):
        with torch.no_grad():
            for a, c in _pairs(self.averaged.module, pl_module):
                tmp = a.data.clone()
                a.data.copy_(c.data)
                c.data.copy_(tmp)

    def copy_into(self, pl_module):
        raw = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        with torch.no_grad():
            for a, c in _pairs(self.averaged.module, pl_module):
                c.data.copy_(a.data)
        return raw

    def save(self, checkpoint, pl_module, swapped, raw_at_end):
        average = self.averaged.state_dict()
        checkpoint["current_model_state"] = checkpoint["state_dict"] if raw_at_end is None else raw_at_end
        checkpoint["state_dict"] = {n[len("module.") :]: v for n, v in average.items() if n.startswith("module.")}
        checkpoint["averaging_state"] = {n: v for n, v in average.items() if not n.startswith("module.")}

    def load(self, checkpoint, pl_module):
        if "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            average = {"module." + n: v for n, v in checkpoint["state_dict"].items()}
            self.averaged.load_state_dict(average | checkpoint["averaging_state"])
            pl_module.load_state_dict(checkpoint["current_model_state"])  # "state_dict" held the average
        else:
            log.warning("the checkpoint was not written with EMA: the average starts from its weights")
            self.averaged.module.load_state_dict(deepcopy(checkpoint["state_dict"]), strict=False)

    def load_full(self, state_dict, strict, source):
        load_state_dict_checked(self.averaged.module, state_dict, source, strict=strict)
        self.averaged.n_averaged.fill_(1)  # an initialised average is not overwritten by the first update

    def prepare(self, trainer):
        return None

    def release(self):
        return None

    def average_module(self, pl_module, swapped, step):
        return pl_module if swapped else self.averaged.module

    def whole_copies(self, pl_module, swapped):
        if swapped:  # the EMA weights live in pl_module
            return {"raw": self.averaged.module, "ema": pl_module}
        return {"raw": pl_module, "ema": self.averaged.module}

    def state(self):
        return {}

    def load_state(self, state, num_updates):
        return None
