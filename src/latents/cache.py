"""The latent cache format: files, manifest, normalisation statistics, and reading a finished cache.

Layout of a cache directory (written by ``difflab.latents.encode.encode_dataset``)::

    manifest.json              what produced it (autoencoder identity, dataset), progress, normalisation
    <split>/latents.npy        N x C x h x w raw latents (float16 or float32), memory-mappable .npy
    <split>/labels.npy         N int64 class labels            (class-conditional data only)
    <split>/texts.json         JSON list of N prompts          (text-conditional data only)

Latents are stored raw (exactly what ``autoencoder.encode`` returned, rounded to the storage dtype); the
normalisation is an affine map per channel recorded in the manifest (EDM2 style)::

    scale = target_std / std        shift = -mean * scale        x = z * scale + shift

with mean/std computed over the train split, so diffusion trains on latents with mean 0 and std ``target_std``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from difflab.autoencoders.loading import known_identity, load_autoencoder
from difflab.latents.format import FORMAT, LABELS, LATENTS, TEXTS, TEXTS_PARTIAL, VERSION, new_manifest, read_manifest  # noqa: F401 - the format
from difflab.latents.latent_set import LatentSet
from difflab.latents.normalisation import channel_moments, denormalise, normalisation, normalise  # noqa: F401
from difflab.latents.shard_reader import LatentShards
from difflab.storage.litdata_shards import LAYOUT
from difflab.storage.location import is_url
from difflab.storage.manifest import (  # noqa: F401
    MANIFEST,
    STATUS_COMPLETE,
    STATUS_IN_PROGRESS,
    check_manifest_data,
    clear_cache,
    now,
    split_dir,
    write_manifest,
)
from difflab.trust import config_target
from difflab.utils.errors import ConfigError, CorruptDataError, DataNotFoundError


class NormalisedAutoencoder(nn.Module):
    """An autoencoder whose ``encode`` returns normalised latents and ``decode`` accepts them.

    Hand this to the DiffusionModule (as ``autoencoder``) so sampling decodes normalised latents correctly.
    """

    def __init__(self, autoencoder: nn.Module, scale, shift):
        super().__init__()
        self.autoencoder = getattr(autoencoder, "module", autoencoder)  # unwrap a Frozen holder
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).flatten())
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32).flatten())
        self.latent_channels = getattr(self.autoencoder, "latent_channels", len(self.scale))
        self.downsample_factor = getattr(self.autoencoder, "downsample_factor", None)

    def encode(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return normalise(self.autoencoder.encode(x, **kwargs), self.scale, self.shift)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(denormalise(x, self.scale, self.shift))

    def identity(self) -> dict:
        return known_identity(self.autoencoder)


# ---------------------------------------------------------------------------------------------- reading
class LatentCache(LatentSet):
    """A finished cache opened for reading: manifest, normalisation tensors, memory-mapped arrays per split."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir).expanduser()
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise DataNotFoundError(
                f"no latent cache at {self.dir} ({MANIFEST} missing): create it with "
                f"python encode_latents.py autoencoder=... datamodule=... out_dir={self.dir}"
            )
        if manifest.get("layout", "mmap") != "mmap":  # difflab.latents.shards
            raise ConfigError(
                f"{self.dir} holds sharded latents, not a memory-mapped cache: read it with datamodule=latents_stream"
            )
        if manifest.get("status") != STATUS_COMPLETE:
            done = {s: f"{v.get('done', 0)}/{v.get('count', '?')}" for s, v in manifest.get("splits", {}).items()}
            raise ConfigError(
                f"latent cache {self.dir} is incomplete ({done}): rerun encode_latents.py with "
                f"out_dir={self.dir} to finish it"
            )
        self.use_manifest(manifest)

    def latents_path(self, split: str) -> Path:
        return split_dir(self.dir, split) / LATENTS

    def labels_path(self, split: str) -> Path | None:
        return split_dir(self.dir, split) / LABELS if self.split_info(split).get("has_label") else None

    def texts(self, split: str) -> list[str] | None:
        """The prompts of a split (loaded into memory: text is small next to latents), or None."""
        if not self.split_info(split).get("has_text"):
            return None
        path = split_dir(self.dir, split) / TEXTS
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CorruptDataError(f"cannot read {path} ({e}); rerun encode_latents.py with overwrite=true") from e

    def open_latents(self, split: str) -> np.ndarray:
        """The split's raw latents as a read-only memory map (nothing is read until indexed)."""
        return open_array(self.latents_path(split))


def open_array(path: Path) -> np.ndarray:
    """np.load(mmap_mode='r') with a one-line CorruptDataError naming the file."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise CorruptDataError(
            f"cannot memory-map latent cache file {path} ({e}); rerun encode_latents.py with overwrite=true"
        ) from e


def open_latent_set(cache_dir: str | Path) -> LatentSet:
    """A memory-mapped cache, or a shard directory (object-storage URL or ``"layout": "shards"`` manifest)."""
    if is_url(cache_dir):
        return LatentShards(cache_dir, check_index=False)
    manifest = read_manifest(Path(cache_dir).expanduser())
    if manifest is not None and manifest.get("layout") == LAYOUT:
        return LatentShards(cache_dir, check_index=False)
    return LatentCache(cache_dir)


@config_target
def load_cache_autoencoder(cache_dir: str | Path) -> NormalisedAutoencoder:
    """The frozen autoencoder a cache (or shard directory) was encoded with, reloaded from its recorded spec,
    verified by hash, and wrapped to decode the cache's normalised latents. Latent DiffusionModules take it as
    ``autoencoder``."""
    cache = open_latent_set(cache_dir)
    spec = (cache.manifest.get("autoencoder") or {}).get("spec")
    if not spec:
        raise ConfigError(
            f"latent cache {cache.dir} records no reload spec for its autoencoder; re-encode it with "
            f"encode_latents.py from a saved autoencoder checkpoint"
        )
    module, _ = load_autoencoder(spec, source=f"{cache.dir}/{MANIFEST}")
    cache.check_autoencoder(module)
    return NormalisedAutoencoder(module, cache.scale, cache.shift)
