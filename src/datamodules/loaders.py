"""Resumable data loaders for every datamodule: ``make_loader`` builds a torchdata ``StatefulDataLoader``.

Lightning (2.6) stores the ``state_dict()`` of every training loader that has ``state_dict`` / ``load_state_dict``
in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and hands it back before the first batch of a
resumed run. With ``ResumableDataLoader`` a run killed at any step and resumed sees the same batches in the same
order with the same augmentations as the uninterrupted run:

- order: ``EpochShuffleSampler`` shuffles with a permutation of ``(seed, epoch)`` (the formula of torch's
  ``DistributedSampler``, which Lightning substitutes under DDP); position within the epoch is the number of
  samples already handed out (torchdata skips them on resume, without loading them);
- epoch and seed of the sampler are part of the state and set before the resumed iterator is built. Lightning calls
  ``set_epoch`` only after it has created the iterator, and a multi-worker iterator draws its first indices at
  creation, so without this a resumed epoch ``e`` (and any resume of a DDP run with workers) would replay epoch 0's
  order;
- workers: torchdata restores every worker's dataset state; the datasets of this package are
  ``difflab.ops.rng.WorkerRNGState``, whose state is the worker's RNG states, so random augmentations continue where
  they stood. The workers' base seed comes from the loader's own generator (saved too), never from the global RNG;
- nothing in here draws from the main process's global RNG (the plain ``DataLoader`` draws a sampler seed and a
  worker base seed from it every epoch), so the training noise stream that ``RNGState`` restores is untouched;
- a checkpoint written on the last batch of an epoch resumes at the start of the next epoch (the restored
  iterator is marked finished);
- DDP: Lightning saves rank 0's checkpoint only, so the state of every rank is gathered into it (``state_dict`` is
  collective, like ``RNGState``'s) and each rank takes its own back.

Limits: resuming with a different ``num_workers`` or world size restarts the interrupted epoch from its first batch
(with a warning) instead of continuing mid-epoch.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from typing import Any, Callable, Sized

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader

log = logging.getLogger(__name__)

# torchdata 0.11 calls torch.set_vital in every StatefulDataLoader constructor, which torch >= 2.9 deprecates
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

STATE_KEY = "difflab"  # our part of the loader state (sampler epoch/seed, base-seed generator)
_RANKS_KEY = "difflab_ranks"  # the per-rank loader states of a DDP checkpoint
_FINISHED = "_iterator_finished"  # torchdata's flag: the saved iterator was exhausted


def loader_seed(seed: int | None = None) -> int:
    """The shuffle seed: ``seed``, else the run's global seed (``PL_GLOBAL_SEED``, set by ``seed_everything``;
    the seed Lightning's ``DistributedSampler`` uses), else torch's initial seed. Reading it draws nothing."""
    if seed is not None:
        return int(seed)
    env = os.environ.get("PL_GLOBAL_SEED")
    return int(env) if env not in (None, "") else int(torch.initial_seed())


def _mix(seed: int, stream: int) -> int:
    """A 63-bit seed for one named stream of ``seed`` (independent of ``seed + epoch`` used for permutations)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, stream]).generate_state(1, np.uint64)[0] >> 1)


class EpochShuffleSampler(RandomSampler):
    """A random permutation per epoch, ``randperm(n)`` seeded with ``seed + epoch`` (like ``DistributedSampler``
    with one replica; Lightning replaces it with a ``DistributedSampler`` of the same seed under DDP, since it is a
    ``RandomSampler``). Lightning calls ``set_epoch`` every epoch; the permutation is fixed when iteration starts."""

    def __init__(self, data_source: Sized, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = loader_seed(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed((self.seed + self.epoch) & 0xFFFFFFFFFFFFFFFF)
        return iter(torch.randperm(len(self.data_source), generator=g).tolist())

    def __len__(self) -> int:
        return len(self.data_source)


def _samplers(loader) -> list:
    """The sampler objects of a loader (``sampler`` and ``batch_sampler.sampler``, each once)."""
    found: dict[int, Any] = {}
    for s in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if s is not None:
            found[id(s)] = s
    return list(found.values())


def _saved_num_workers(state: dict) -> int:
    snap = state.get("_snapshot")
    if isinstance(snap, dict):
        return int(snap.get("_main_snapshot", {}).get("_num_workers", -1))
    return 0 if "_num_yielded" in state else -1


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResumableDataLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose state also holds the sampler's epoch and seed and the base-seed generator,
    marks end-of-epoch states as finished, and under DDP carries every rank's state (see the module docstring)."""

    _difflab_pending: dict | None = None

    # ------------------------------------------------------------------------------------------- epoch helpers
    def _sampler_attr(self, name: str):
        for s in _samplers(self):
            value = getattr(s, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    def _set_epoch(self, epoch: int) -> None:
        for s in _samplers(self):
            if callable(getattr(s, "set_epoch", None)):
                s.set_epoch(int(epoch))

    def _at_epoch_end(self) -> bool:
        it = self._iterator
        if it is None:
            return False
        try:
            return it._num_yielded >= len(self)
        except TypeError:  # no length (iterable dataset)
            return False

    # ----------------------------------------------------------------------------------------------- state
    def _local_state_dict(self) -> dict[str, Any]:
        sd = dict(super().state_dict())
        if not sd.get(_FINISHED) and self._at_epoch_end():
            sd[_FINISHED] = True  # resume at the start of the next epoch, not on an exhausted iterator
        sd[STATE_KEY] = {
            "epoch": self._sampler_attr("epoch"),
            "seed": self._sampler_attr("seed"),
            "generator": None if self.generator is None else self.generator.get_state(),
            "num_workers": int(self.num_workers),
        }
        return sd

    def state_dict(self) -> dict[str, Any]:
        """This loader's position; under DDP a collective that returns every rank's state (rank 0 saves it)."""
        sd = self._local_state_dict()
        rank, world = _world()
        if world == 1:
            return sd
        states: list = [None] * world
        dist.all_gather_object(states, sd)
        return {_RANKS_KEY: states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict`` (a single-process state or a DDP checkpoint's per-rank states)."""
        self._difflab_pending = None
        if not state_dict:
            super().load_state_dict({})
            return
        states = state_dict[_RANKS_KEY] if _RANKS_KEY in state_dict else [state_dict]
        rank, world = _world()
        if len(states) != world:
            log.warning(
                "data loader state was saved with %d ranks, resuming with %d: the interrupted epoch "
                "restarts from its first batch",
                len(states),
                world,
            )
            self._restart_epoch(states[0] or {})
            return
        sd = copy.copy(states[rank])
        ours = sd.pop(STATE_KEY, None) or {}
        saved_workers = _saved_num_workers(sd)
        if saved_workers != int(self.num_workers):
            log.warning(
                "data loader state was saved with num_workers=%s, resuming with %d: the interrupted epoch "
                "restarts from its first batch",
                saved_workers,
                self.num_workers,
            )
            self._restart_epoch({**sd, STATE_KEY: ours})
            return
        super().load_state_dict(sd)
        self._restore_sampler(ours)
        self._difflab_pending = ours

    def _restore_sampler(self, ours: dict) -> None:
        if ours.get("seed") is not None:
            for s in _samplers(self):
                if isinstance(getattr(s, "seed", None), int):
                    s.seed = int(ours["seed"])
        if ours.get("epoch") is not None:
            self._set_epoch(ours["epoch"])  # before the iterator exists: Lightning's set_epoch comes too late

    def _restart_epoch(self, state: dict) -> None:
        """Fallback when the saved position cannot be used: the saved epoch from its start (the next epoch when the
        saved one was complete), same seed and base-seed generator."""
        super().load_state_dict({})
        ours = dict(state.get(STATE_KEY) or {})
        if state.get(_FINISHED) and ours.get("epoch") is not None:
            ours["epoch"] = int(ours["epoch"]) + 1
        self._restore_sampler(ours)
        if ours.get("generator") is not None and self.generator is not None:
            self.generator.set_state(ours["generator"])

    def _get_iterator(self):
        pending, self._difflab_pending = self._difflab_pending, None
        it = super()._get_iterator()
        if pending is not None:
            if pending.get("generator") is not None and self.generator is not None:
                # the restored iterator drew (and discarded) a base seed: continue the saved generator instead
                self.generator.set_state(pending["generator"])
            if it._finished and pending.get("epoch") is not None:
                self._set_epoch(int(pending["epoch"]) + 1)  # the saved epoch was complete: the next one starts
        return it


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    collate_fn: Callable | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> ResumableDataLoader:
    """The one loader constructor of the datamodules: ``DataLoader`` arguments, resumable mid-epoch.

    ``shuffle`` uses an ``EpochShuffleSampler`` (seed ``seed`` or the run's global seed); the workers' base seeds
    come from a generator of the same seed. ``persistent_workers`` only applies with ``num_workers > 0``.
    Remaining keyword arguments go to ``StatefulDataLoader`` (``prefetch_factor``, ``worker_init_fn``, ...).
    """
    seed = loader_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(_mix(seed, 1))
    num_workers = int(num_workers)
    return ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(dataset, seed) if shuffle else None,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=bool(persistent_workers) and num_workers > 0,
        collate_fn=collate_fn,
        generator=generator,
        **kwargs,
    )
