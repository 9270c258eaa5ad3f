"""Serve a latent cache (written by ``encode_latents.py``) as normalised dict batches, memory-mapped, no decoding.

Batches: ``{"x": B x C x h x w float32 normalised latents, "label": int64 B?, "text": list[str]?}``. The arrays stay
on disk (read-only memory maps opened lazily in each worker); a batch reads only its own rows, so process memory
does not grow with the cache size (mapped pages are shared, reclaimable page cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from difflab.autoencoders.loading import load_autoencoder
from difflab.datamodules.loaders import make_loader
from difflab.latents.cache import LatentCache, NormalisedAutoencoder, normalise, open_array
from difflab.ops.rng import WorkerRNGState
from difflab.utils.errors import ConfigError


class LatentDataset(WorkerRNGState, Dataset):
    """Rows of a memory-mapped latent array, normalised per channel, optionally flipped horizontally (p=0.5).

    Implements ``__getitems__`` so a DataLoader fetches a whole batch with one vectorised read.
    """

    def __init__(
        self,
        latents_path: str | Path,
        scale: torch.Tensor,
        shift: torch.Tensor,
        labels_path: str | Path | None = None,
        texts: list[str] | None = None,
        flip: bool = False,
    ):
        self.latents_path, self.labels_path = Path(latents_path), Path(labels_path) if labels_path else None
        self.scale, self.shift = scale.float(), shift.float()
        self.texts, self.flip = texts, flip
        self._latents = self._labels = None
        self._len = len(open_array(self.latents_path))

    def __getstate__(self):  # workers re-open the maps instead of receiving pickled copies of the data
        state = dict(self.__dict__)
        state["_latents"] = state["_labels"] = None
        return state

    def _open(self) -> None:
        if self._latents is None:
            self._latents = open_array(self.latents_path)
            self._labels = open_array(self.labels_path) if self.labels_path else None

    def __len__(self) -> int:
        return self._len

    def __getitems__(self, indices) -> dict:
        """One batch dict for ``indices`` (rows are read in sorted order; order within a batch is irrelevant)."""
        self._open()
        idx = np.sort(np.asarray(indices, dtype=np.int64))
        z = torch.from_numpy(np.asarray(self._latents[idx], dtype=np.float32))
        x = normalise(z, self.scale, self.shift)
        if self.flip:
            mask = torch.rand(len(idx)) < 0.5
            x[mask] = x[mask].flip(-1)
        batch = {"x": x}
        if self._labels is not None:
            batch["label"] = torch.from_numpy(np.asarray(self._labels[idx], dtype=np.int64))
        if self.texts is not None:
            batch["text"] = [self.texts[i] for i in idx.tolist()]
        return batch

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}


def collate_batches(items: Any) -> Any:
    """Pass through batches already built by ``LatentDataset.__getitems__``; collate lists of samples."""
    return items if isinstance(items, dict) else default_collate(items)


class LatentDataModule(L.LightningDataModule):
    """Datamodule over a finished latent cache; ``sample_shape`` is the latent shape.

    Besides the usual attributes (``num_classes``, ``class_names``, ``prompts``, ``sample_shape``) it exposes
    ``pixel_shape``, ``latent_scale``/``latent_shift`` (x = z * scale + shift per channel), ``autoencoder_spec``
    ({spec, hash, class}: how to reload the autoencoder and the hash it must have), ``decode_latents`` and
    ``normalised_autoencoder`` for the diffusion module.
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
    ):
        super().__init__()
        self.cache = LatentCache(cache_dir)
        m = self.cache.manifest
        self.batch_size, self.flip, self.num_workers = int(batch_size), bool(flip), int(num_workers)
        self.pin_memory, self.persistent_workers = pin_memory, bool(persistent_workers) and num_workers > 0
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_classes = m.get("num_classes")
        self.class_names = m.get("class_names")
        self.prompts = m.get("prompts")
        self.sample_shape = tuple(m["latent_shape"])
        self.pixel_shape = tuple(m["pixel_shape"])
        self.latent_scale, self.latent_shift = self.cache.scale.clone(), self.cache.shift.clone()
        ae = m["autoencoder"]
        self.autoencoder_spec = {"spec": ae.get("spec"), "hash": ae["hash"], "class": ae.get("class")}
        self.datasets: dict[str, LatentDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        for split in self.cache.splits:
            if split not in self.datasets:
                self.datasets[split] = LatentDataset(
                    self.cache.latents_path(split),
                    self.latent_scale,
                    self.latent_shift,
                    labels_path=self.cache.labels_path(split),
                    texts=self.cache.texts(split),
                    flip=self.flip and split == "train",
                )

    def dataset(self, split: str) -> LatentDataset:
        """The dataset of ``split`` (after ``setup``)."""
        self.setup()
        return self.datasets[split]

    def _loader(self, split: str, train: bool):
        if split not in self.cache.splits:
            return []
        return make_loader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=self.shuffle and train,
            drop_last=self.drop_last and train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_batches,
        )

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val", train=False)

    def test_dataloader(self):
        return self._loader("test", train=False)

    # ---------------------------------------------------------------- decoding
    def decode_latents(self, autoencoder: Any, z_normalised: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] for normalised latents; ConfigError if ``autoencoder`` is not the cache's."""
        return self.cache.decode_latents(autoencoder, z_normalised)

    def normalised_autoencoder(self, autoencoder: Any) -> NormalisedAutoencoder:
        """``autoencoder`` (checked against the cache hash) wrapped to encode/decode normalised latents."""
        self.cache.check_autoencoder(autoencoder)
        return NormalisedAutoencoder(autoencoder, self.latent_scale, self.latent_shift)

    def load_autoencoder(self):
        """Reload the cache's autoencoder from its recorded spec (frozen), checked against the recorded hash."""

        if not self.autoencoder_spec["spec"]:
            raise ConfigError(
                f"latent cache {self.cache.dir} records no reload spec for its autoencoder (it was "
                f"encoded from an in-memory model): pass the autoencoder explicitly"
            )
        module, _ = load_autoencoder(self.autoencoder_spec["spec"], source=f"{self.cache.dir}/manifest.json")
        self.cache.check_autoencoder(module)
        return module
