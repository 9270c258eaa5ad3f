"""Save and restore random-number-generator states in checkpoints, per rank, so resumed runs draw the same noise.

Lightning checkpoints hold weights, optimizer, schedulers, loop counters and callback states, but no RNG states:
a resumed diffusion run would draw different timesteps, noise and label dropout than the uninterrupted run.
``RNGState`` stores torch (CPU and every CUDA device), numpy and Python ``random`` states of every rank, as tensors
only, so the checkpoint still loads with ``weights_only=True``.

Data loader workers have their own generators (seeded per worker, advanced by random augmentations): datasets that
mix in ``WorkerRNGState`` report them to torchdata's ``StatefulDataLoader`` (difflab.datamodules.loaders), which
checkpoints them with the loader state, so a run resumed mid-epoch draws the same flips / clip windows.
"""

from __future__ import annotations

import logging
import random

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)


def collect_rng_states() -> dict[str, torch.Tensor]:
    """This process's RNG states as CPU tensors (torch, cuda per device, numpy MT19937, python Mersenne Twister)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor([py_version, *py_internal], dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if py_gauss is None else py_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.stack([s.to(torch.uint8) for s in torch.cuda.get_rng_state_all()])
    return states


def _own(t: torch.Tensor) -> torch.Tensor:
    """A CPU uint8 copy with its own storage: ``torch.set_rng_state`` crashes (segfault, torch 2.x) on a view with a
    storage offset, such as rank r's row of the stacked per-rank states of a DDP checkpoint."""
    return t.detach().to(device="cpu", dtype=torch.uint8).clone(memory_format=torch.contiguous_format)


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    """Inverse of ``collect_rng_states``."""
    torch.set_rng_state(_own(states["torch"]))
    meta = states["numpy_meta"].tolist()
    np.random.set_state(
        (
            "MT19937",
            states["numpy_keys"].numpy().astype(np.uint32),
            int(meta[0]),
            int(meta[1]),
            float(states["numpy_gauss"][0]),
        )
    )
    py = states["python"].tolist()
    gauss = float(states["python_gauss"][0])
    random.setstate((int(py[0]), tuple(int(v) for v in py[1:]), None if gauss != gauss else gauss))
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if cuda.shape[0] == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_own(s) for s in cuda])
        else:
            log.warning(
                "checkpoint has CUDA RNG states of %d devices, this machine has %d; not restored",
                cuda.shape[0],
                torch.cuda.device_count(),
            )


class WorkerRNGState:
    """Mixin for map-style datasets: inside a DataLoader worker, ``state_dict`` is that worker's RNG states.

    A torchdata ``StatefulDataLoader`` asks every worker for its dataset's ``state_dict`` after each batch and keeps
    the one belonging to the last batch it handed out; on resume it gives each new worker its own state back
    (after seeding it and running ``worker_init_fn``). So a worker that draws augmentations from the global torch /
    numpy / ``random`` generators (random flips, random clip windows) continues exactly where the interrupted run's
    worker stood. Outside a worker (``num_workers=0``) the state is empty: the main process's generators belong to
    ``RNGState``, which restores them with the rest of the checkpoint.
    """

    def state_dict(self) -> dict:
        from torch.utils.data import get_worker_info

        return {} if get_worker_info() is None else {"rng": collect_rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        from torch.utils.data import get_worker_info

        if state_dict and "rng" in state_dict and get_worker_info() is not None:
            set_rng_states(state_dict["rng"])


def _gather(trainer: L.Trainer, t: torch.Tensor) -> torch.Tensor:
    """All ranks' copies of a same-shaped tensor, stacked along dim 0 (a collective: every rank must call it)."""
    dev = trainer.strategy.root_device
    gathered = trainer.strategy.all_gather(t.to(dev))
    return gathered.reshape(trainer.world_size, *t.shape).cpu()


class RNGState(L.Callback):
    """Checkpoints every rank's RNG states and restores them on resume (rank r gets rank r's states)."""

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self.restored = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict:
        states = collect_rng_states()
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return {"world_size": 1, "ranks": {k: v[None] for k, v in states.items()}}
        # dump_checkpoint runs on every rank, so gathering here is collective-safe; only rank 0 writes the file
        ranks = {}
        for k, v in states.items():
            if v.dtype == torch.uint8:
                ranks[k] = _gather(trainer, v.to(torch.int32)).to(torch.uint8)
            else:
                ranks[k] = _gather(trainer, v)
        return {"world_size": trainer.world_size, "ranks": ranks}

    def load_state_dict(self, state_dict: dict) -> None:
        trainer = self._trainer
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        saved_world = int(state_dict.get("world_size", 1))
        if saved_world != world:
            log.warning(
                "RNG states were saved with %d ranks, resuming with %d: the random stream will differ from an "
                "uninterrupted run",
                saved_world,
                world,
            )
        ranks = state_dict["ranks"]
        idx = min(rank, next(iter(ranks.values())).shape[0] - 1)
        set_rng_states({k: v[idx] for k, v in ranks.items()})
        self.restored = True
