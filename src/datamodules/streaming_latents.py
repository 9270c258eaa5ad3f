"""Serve a sharded latent dataset (``encode_latents.py format=shards``) as normalised dict batches, streamed with
litdata from a local directory or object storage (s3://, gs://, azure://, r2://).

Batches are those of ``difflab.datamodules.latents.LatentDataModule``: ``{"x": B x C x h x w float32 normalised
latents, "label": int64 B?, "text": list[str]?}`` (plus ``"index"``, the source rows, with ``return_index=True``).
The datamodule exposes the same attributes (``sample_shape``, ``pixel_shape``, ``num_classes``, ``class_names``,
``prompts``, ``latent_scale`` / ``latent_shift``, ``autoencoder_spec``, ``decode_latents``, ...).

Order (litdata ``StreamingDataset`` + ``StreamingDataLoader``):

- each epoch shuffles the shard order and, inside every shard, the samples (a full permutation, seeded with
  ``(seed, epoch, shard)``); shards are split between the DDP ranks and then between the loader workers of each
  rank, without overlap; the order is a function of (seed, epoch, world size, num_workers, batch size) only (the
  file system's kind does not change it: litdata's windowed shuffle for parallel file systems is turned off);
- ``seed``: the datamodule's, else the run's global seed (``PL_GLOBAL_SEED``), else 0. Every rank must use the same
  seed, so it never comes from a per-process random state;
- under DDP (more than one rank) the last samples are dropped so that every rank gets the same number of batches
  (for val too: a DDP validation pass skips at most ``world_size x batch_size`` samples);
- ``flip`` mirrors a sample when a hash of (seed, epoch, source row) says so: random-looking, but the same in a
  resumed run;
- the loaders never draw from the process's global RNG (torch's worker base seed comes from the loader's own
  generator), so the training noise that ``difflab.ops.rng.RNGState`` restores is the same in a resumed run.

Resume: the train loader is a ``StreamingDataLoader`` with ``state_dict`` / ``load_state_dict``, which Lightning
saves in every checkpoint (``loops.fit_loop.state_dict.combined_loader``) and gives back before the first batch of a
resumed run: the run continues with the next batch of the interrupted epoch, in the same order. litdata's state is
rank-independent (all ranks have yielded the same number of batches), so rank 0's checkpoint serves every rank.
Resuming with another number of workers or ranks continues the epoch without repeating samples (litdata's elastic
resume), though in another order. The shard directory may move between runs (a copy on node-local disk): the saved
position is tied to the shard layout (split size, samples per shard, write order), not to the path.

litdata is an optional extra: ``pip install 'difflab[stream]'``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import lightning as L
import numpy as np
import torch

from difflab.autoencoders.loading import load_autoencoder
from difflab.latents.cache import NormalisedAutoencoder, normalise
from difflab.latents.shard_reader import LatentShards, open_shards
from difflab.storage.location import INSTALL, is_url
from difflab.utils.errors import ConfigError

try:  # optional extra: the classes below need litdata's bases; the datamodule reports a missing litdata in one line
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming.item_loader import PyTreeLoader as _PyTreeLoader
    from litdata.utilities.env import _DistributedEnv

    HAVE_LITDATA = True
except ImportError:  # pragma: no cover - exercised only without the extra
    StreamingDataLoader = StreamingDataset = _PyTreeLoader = object  # type: ignore[misc,assignment]
    _DistributedEnv = None
    HAVE_LITDATA = False

STATE_KEY = "difflab_shards"  # our part of the loader state: the shard layout the position refers to
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def stream_seed(seed: int | None = None) -> int:
    """The shuffle seed: ``seed``, else the run's global seed (``PL_GLOBAL_SEED``), else 0 (never a per-process
    random value: all DDP ranks must partition the same permutation)."""
    if seed is not None:
        return int(seed)
    env = os.environ.get("PL_GLOBAL_SEED")
    return int(env) if env not in (None, "") else 0


def world_size() -> int:
    """The number of ranks litdata sees (torch.distributed, or the WORLD_SIZE / GLOBAL_RANK variables it reads)."""
    return _DistributedEnv.detect().world_size if HAVE_LITDATA else 1


def _splitmix(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def flip_mask(seed: int, epoch: int, rows: np.ndarray) -> np.ndarray:
    """Which samples to mirror: one bit of a hash of (seed, epoch, source row); independent of the read order."""
    key = _splitmix(np.asarray([(int(seed) << 20) ^ int(epoch)], dtype=np.uint64) & _M64)
    with np.errstate(over="ignore"):
        h = _splitmix(rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ key)
    return (h >> np.uint64(63)).astype(bool)


class PyTreeLoader(_PyTreeLoader):
    """litdata's record loader (same class name: litdata checks it against the one in the shards' index), reading a
    record straight from the mapped shard. (litdata's local fast path first maps a 256 KB page around every record,
    made for sequential reads; with a full in-shard shuffle every record needs a new page and reading is 3-4x
    slower.)"""

    def set_posix_fast(self, enabled: bool, keep: int = 4, *, willneed: bool = True) -> None:
        super().set_posix_fast(enabled, keep, willneed=willneed)
        self._page_bytes = 0


class LatentStreamingDataset(StreamingDataset):
    """One split of a shard directory; records gain the epoch they are read in (for ``flip``)."""

    def __init__(
        self,
        location: str,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool | None,
        cache_dir: str | None,
        max_cache_size: int | str | None,
        storage_options: dict | None,
        tag_epoch: bool,
    ):
        super().__init__(
            location,
            cache_dir=cache_dir,
            item_loader=PyTreeLoader(),
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
            max_cache_size=max_cache_size,
            storage_options=storage_options,
            item_shuffle_window=0,
            batch_decode=0,
        )
        self.tag_epoch = tag_epoch
        if self.posix_fast is not None and self.posix_fast.window_shuffle:
            # the same order on every file system: litdata picks a windowed shuffle on NFS/Lustre/GPFS/...
            self.posix_fast = dataclasses.replace(self.posix_fast, kind="posix")

    def __getitem__(self, index):
        item = super().__getitem__(index)
        if self.tag_epoch and isinstance(item, dict):
            item["epoch"] = self.current_epoch
        return item


class LatentCollate:
    """Records -> one batch dict: raw latents stacked, normalised per channel, optionally mirrored."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, flip: bool, seed: int, return_index: bool):
        self.scale, self.shift = scale.float(), shift.float()
        self.flip, self.seed, self.return_index = flip, seed, return_index

    def __call__(self, items: list[dict]) -> dict:
        z = torch.from_numpy(np.stack([it["z"] for it in items]).astype(np.float32))
        x = normalise(z, self.scale, self.shift)
        rows = np.fromiter((it["index"] for it in items), dtype=np.int64, count=len(items))
        if self.flip:
            mask = torch.from_numpy(flip_mask(self.seed, items[0].get("epoch", 0), rows))
            x[mask] = x[mask].flip(-1)
        batch = {"x": x}
        if "label" in items[0]:
            batch["label"] = torch.tensor([it["label"] for it in items], dtype=torch.int64)
        if "text" in items[0]:
            batch["text"] = [it["text"] for it in items]
        if self.return_index:
            batch["index"] = torch.from_numpy(rows)
        return batch


class ShardLoader(StreamingDataLoader):
    """litdata's resumable loader with: a fixed number of workers, a state tied to the shard layout (not the path),
    and persistent workers that never replay an epoch after a partial one."""

    def __init__(self, dataset: LatentStreamingDataset, *, layout: dict, **kwargs: Any):
        posix, dataset.posix_fast = dataset.posix_fast, None
        try:  # litdata lowers num_workers to fit the free memory on local data: that would change the order
            super().__init__(dataset, **kwargs)
        finally:
            dataset.posix_fast = posix
        self.layout = layout
        self._epoch_complete = True

    def __iter__(self):
        if getattr(self, "_iterator", None) is not None and not self._epoch_complete:
            # persistent workers count epochs themselves and miss a partial one (limit_train_batches, an
            # interrupted epoch): start fresh workers, which take the epoch from this loader
            self.close()
        self._epoch_complete = False
        yield from super().__iter__()
        self._epoch_complete = True

    def close(self) -> None:
        """Stop persistent workers now (Lightning does so at the end of fit; left to the garbage collector, idle
        litdata workers take ~5 s each to go)."""
        if getattr(self, "_iterator", None) is not None:
            self._iterator._shutdown_workers()
            self._iterator = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[STATE_KEY] = dict(self.layout)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved = state.pop(STATE_KEY, None)
        if saved is not None and saved != self.layout:
            raise ConfigError(
                f"the checkpoint's data position refers to shards {saved}, the datamodule reads "
                f"{self.layout}: resume with the same shard directory, or start a new run from the "
                f"weights (init_from=...)"
            )
        ds_state = dict(state["dataset"])
        if ds_state.get("shuffle") != self.dataset.shuffle:
            raise ConfigError(
                f"the checkpoint's data position was saved with shuffle={ds_state.get('shuffle')}, "
                f"this run has shuffle={self.dataset.shuffle}: resume with the same setting"
            )
        # the position is tied to the shard layout, not to where the shards are now
        ds_state.update(
            input_dir_path=self.dataset.input_dir.path,
            input_dir_url=self.dataset.input_dir.url,
            cache_dir_path=self.dataset.cache_dir.path,
        )
        state["dataset"] = ds_state
        super().load_state_dict(state)
        self._epoch_complete = True


class ShardSplitLoaders:
    """The train / val / test loaders of a shard datamodule: ``self.loader(split, train)`` for the splits the shards
    hold (``self.shards.splits``), an empty list for the others (Lightning then skips that stage)."""

    def _maybe(self, split: str, train: bool):
        return self.loader(split, train) if split in self.shards.splits else []

    def train_dataloader(self):
        return self._maybe("train", train=True)

    def val_dataloader(self):
        return self._maybe("val", train=False)

    def test_dataloader(self):
        return self._maybe("test", train=False)


class StreamingLatentDataModule(ShardSplitLoaders, L.LightningDataModule):
    """Datamodule over a sharded latent dataset; ``sample_shape`` is the latent shape.

    ``cache_dir``: the shard directory, a local path or an object-storage URL (read through litdata with
    ``storage_options``; downloaded shards go to ``download_dir``, at most ``max_cache_size`` of them at a time).
    The other arguments are those of ``LatentDataModule`` plus ``seed`` (the shuffle seed, see the module
    docstring) and ``return_index`` (add each sample's source row as ``"index"``).
    """

    def __init__(
        self,
        cache_dir: str,
        batch_size: int = 128,
        flip: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int | None = None,
        download_dir: str | None = None,
        max_cache_size: str | None = "50GB",
        storage_options: dict | None = None,
        return_index: bool = False,
    ):
        super().__init__()
        if not HAVE_LITDATA:
            raise ConfigError(
                f"datamodule=latents_stream needs the optional package litdata: {INSTALL} (or pip install litdata)"
            )
        self.storage_options = dict(storage_options) if storage_options else None
        self.shards: LatentShards = open_shards(cache_dir, self.storage_options)
        self.cache = self.shards  # the name LatentDataModule uses
        m = self.shards.manifest
        self.batch_size, self.flip, self.num_workers = int(batch_size), bool(flip), int(num_workers)
        self.pin_memory, self.persistent_workers = pin_memory, bool(persistent_workers) and num_workers > 0
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.download_dir, self.max_cache_size, self.return_index = download_dir, max_cache_size, bool(return_index)
        self.num_classes = m.get("num_classes")
        self.class_names = m.get("class_names")
        self.prompts = m.get("prompts")
        self.sample_shape = tuple(m["latent_shape"])
        self.pixel_shape = tuple(m["pixel_shape"])
        self.latent_scale, self.latent_shift = self.shards.scale.clone(), self.shards.shift.clone()
        ae = m["autoencoder"]
        self.autoencoder_spec = {"spec": ae.get("spec"), "hash": ae["hash"], "class": ae.get("class")}

    # ---------------------------------------------------------------- data
    def dataset(self, split: str, train: bool | None = None) -> LatentStreamingDataset:
        """A fresh streaming dataset over ``split`` (shuffled when ``train`` and ``shuffle``; ``train`` defaults to
        ``split == "train"``). Build it where the ranks are known (litdata reads the world size when it is made)."""
        train = split == "train" if train is None else train
        location = self.shards.split_location(split)
        return LatentStreamingDataset(
            location if is_url(location) else os.path.abspath(location),
            shuffle=bool(self.shuffle and train),
            seed=stream_seed(self.seed),
            drop_last=True if world_size() > 1 else None,
            cache_dir=self.download_dir,
            max_cache_size=self.max_cache_size,
            storage_options=self.storage_options,
            tag_epoch=self.flip and train,
        )

    def loader(self, split: str, train: bool) -> ShardLoader:
        ds = self.dataset(split, train)
        drop_last = True if world_size() > 1 else bool(self.drop_last and train)
        collate = LatentCollate(
            self.latent_scale, self.latent_shift, self.flip and train, stream_seed(self.seed), self.return_index
        )
        # the loader's own generator: torch draws the workers' base seed from the global RNG otherwise, once per
        # epoch, so a resumed run (a new iterator after the RNG states were restored) would draw other training noise
        generator = torch.Generator().manual_seed(stream_seed(self.seed))
        return ShardLoader(
            ds,
            layout=self.shards.layout_identity(split),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=drop_last,
            collate_fn=collate,
            generator=generator,
        )

    # ---------------------------------------------------------------- decoding (as LatentDataModule)
    def decode_latents(self, autoencoder: Any, z_normalised: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] for normalised latents; ConfigError if ``autoencoder`` is not the shards' one."""
        return self.shards.decode_latents(autoencoder, z_normalised)

    def normalised_autoencoder(self, autoencoder: Any) -> NormalisedAutoencoder:
        """``autoencoder`` (checked against the recorded hash) wrapped to encode/decode normalised latents."""
        self.shards.check_autoencoder(autoencoder)
        return NormalisedAutoencoder(autoencoder, self.latent_scale, self.latent_shift)

    def load_autoencoder(self):
        """Reload the autoencoder from its recorded spec (frozen), checked against the recorded hash."""
        if not self.autoencoder_spec["spec"]:
            raise ConfigError(
                f"sharded latents {self.shards.location} record no reload spec for their autoencoder "
                f"(encoded from an in-memory model): pass the autoencoder explicitly"
            )
        module, _ = load_autoencoder(self.autoencoder_spec["spec"], source=f"{self.cache.dir}/manifest.json")
        self.shards.check_autoencoder(module)
        return module
