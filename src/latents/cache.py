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

import datetime as _dt
import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from difflab.autoencoders.loading import known_identity
from difflab.ops.atomic import atomic_write
from difflab.trust import config_target, data_strings, split_name
from difflab.utils.errors import ConfigError, CorruptDataError, DataNotFoundError, UntrustedFileError

FORMAT = "difflab-latent-cache"
VERSION = 1
MANIFEST = "manifest.json"
LATENTS, LABELS, TEXTS, TEXTS_PARTIAL = "latents.npy", "labels.npy", "texts.json", "texts.partial.jsonl"
STATUS_IN_PROGRESS, STATUS_COMPLETE = "in_progress", "complete"


def now() -> str:
    """UTC timestamp for the manifest."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def split_dir(cache_dir: str | Path, split: str) -> Path:
    """The directory of one split: ``train``, ``val`` or ``test`` under the cache, nothing else (split names come
    from manifests, and writers remove these directories)."""
    return Path(cache_dir) / split_name(split, Path(cache_dir) / MANIFEST)


def check_manifest_data(manifest: dict, where: Any) -> dict:
    """The manifest values that difflab turns into paths or model config (split names, class names, prompts, class
    count), checked as plain data (``difflab.trust``); one line naming ``where`` otherwise."""
    splits = manifest.get("splits", {})
    if not isinstance(splits, dict) or not all(isinstance(v, dict) for v in splits.values()):
        raise UntrustedFileError(f"refusing {where}: 'splits' must map split names to records")
    for name in splits:
        split_name(name, where, "splits")
    for key in ("class_names", "prompts"):
        data_strings(manifest.get(key), where, key)
    n = manifest.get("num_classes")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UntrustedFileError(f"refusing {where}: num_classes is {n!r}, not a positive integer")
    return manifest


def read_manifest(cache_dir: str | Path) -> dict | None:
    """The manifest of a cache directory, or None when there is none."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptDataError(f"latent cache manifest {path} is unreadable ({e}); delete the directory or rerun "
                               f"encode_latents.py with overwrite=true") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptDataError(f"{path} is not a difflab latent cache manifest (format != {FORMAT!r})")
    return check_manifest_data(manifest, path)


def clear_cache(cache_dir: str | Path, manifest: dict) -> None:
    """Remove a cache's own files (its manifest and split folders, named by ``split_dir``), nothing else."""
    for split in manifest.get("splits", {}):
        shutil.rmtree(split_dir(cache_dir, split), ignore_errors=True)
    (Path(cache_dir) / MANIFEST).unlink(missing_ok=True)


def write_manifest(cache_dir: str | Path, manifest: dict) -> None:
    """Atomically replace the manifest (write a temp file, fsync, rename) so a crash never leaves half a file."""
    manifest["updated"] = now()
    text = json.dumps(manifest, indent=2)
    atomic_write(Path(cache_dir) / MANIFEST, lambda tmp: tmp.write_text(text))


def new_manifest(identity: dict, dataset: dict, dtype: str, chunk_size: int) -> dict:
    """A fresh in-progress manifest; ``latent_shape``, ``pixel_shape``, splits and ``transform`` are filled later."""
    return {"format": FORMAT, "version": VERSION, "status": STATUS_IN_PROGRESS, "created": now(),
            "autoencoder": identity, "dataset": dataset, "latent_dtype": dtype, "chunk_size": int(chunk_size),
            "splits": {}, "count": {}, "transform": None}


# ---------------------------------------------------------------------------------------------- statistics
def channel_moments(latents: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, variance, count-per-channel) over all axes but 1 of an N x C x ... array, streamed in float64.

    Chunks are combined with Chan et al.'s parallel update, so a memory-mapped array is never loaded whole.
    """
    c = latents.shape[1]
    n, mean, m2 = 0, np.zeros(c), np.zeros(c)
    for i in range(0, len(latents), chunk):
        block = np.asarray(latents[i:i + chunk], dtype=np.float64)
        block = np.moveaxis(block, 1, 0).reshape(c, -1)
        nb = block.shape[1]
        mb = block.mean(1)
        m2b = ((block - mb[:, None]) ** 2).sum(1)
        delta = mb - mean
        tot = n + nb
        mean = mean + delta * nb / tot
        m2 = m2 + m2b + delta ** 2 * n * nb / tot
        n = tot
    if n == 0:
        raise ConfigError("cannot compute latent statistics over an empty train split")
    return mean, m2 / n, n


def normalisation(mean: np.ndarray, var: np.ndarray, target_std: float, per_channel: bool = True) -> dict:
    """The affine map to zero mean and ``target_std`` std: {target_std, per_channel, mean, std, scale, shift}.

    With ``per_channel=False`` one mean/std (pooled over channels) is used for all channels.
    """
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    if not per_channel:
        pooled_mean = mean.mean()
        pooled_var = (var + (mean - pooled_mean) ** 2).mean()  # equal counts per channel
        mean, var = np.full_like(mean, pooled_mean), np.full_like(var, pooled_var)
    std = np.sqrt(var)
    if np.any(std <= 0) or not np.all(np.isfinite(std)):
        raise ConfigError(f"latent std per channel is {std.tolist()}: a channel is constant or not finite, cannot "
                          f"normalise (is the autoencoder trained?)")
    scale = float(target_std) / std
    shift = -mean * scale
    return {"type": "affine", "target_std": float(target_std), "per_channel": bool(per_channel),
            "mean": mean.tolist(), "std": std.tolist(), "scale": scale.tolist(), "shift": shift.tolist()}


def _channel_view(v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return v.to(device=z.device, dtype=z.dtype).view(1, -1, *([1] * (z.dim() - 2)))


def normalise(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Raw latents (B x C x ...) -> normalised: z * scale + shift per channel."""
    return z * _channel_view(scale, z) + _channel_view(shift, z)


def denormalise(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> raw latents the autoencoder decodes: (x - shift) / scale per channel."""
    return (x - _channel_view(shift, x)) / _channel_view(scale, x)


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
class LatentCache:
    """A finished cache opened for reading: manifest, normalisation tensors, memory-mapped arrays per split."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir).expanduser()
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise DataNotFoundError(f"no latent cache at {self.dir} ({MANIFEST} missing): create it with "
                                    f"python encode_latents.py autoencoder=... datamodule=... out_dir={self.dir}")
        if manifest.get("layout", "mmap") != "mmap":  # difflab.latents.shards
            raise ConfigError(f"{self.dir} holds sharded latents, not a memory-mapped cache: read it with "
                              f"datamodule=latents_stream")
        if manifest.get("status") != STATUS_COMPLETE:
            done = {s: f"{v.get('done', 0)}/{v.get('count', '?')}" for s, v in manifest.get("splits", {}).items()}
            raise ConfigError(f"latent cache {self.dir} is incomplete ({done}): rerun encode_latents.py with "
                              f"out_dir={self.dir} to finish it")
        self.manifest = manifest
        t = manifest["transform"]
        self.scale = torch.tensor(t["scale"], dtype=torch.float32)
        self.shift = torch.tensor(t["shift"], dtype=torch.float32)
        self._verified: weakref.WeakSet = weakref.WeakSet()  # autoencoders already checked (hashing is not free)

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["latent_shape"])

    @property
    def autoencoder_hash(self) -> str:
        return self.manifest["autoencoder"]["hash"]

    def count(self, split: str) -> int:
        return int(self.split_info(split)["count"])

    def split_info(self, split: str) -> dict:
        info = self.manifest["splits"].get(split)
        if info is None:
            raise ConfigError(f"latent cache {self.dir} has no split {split!r} (has {self.splits})")
        return info

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

    def check_autoencoder(self, autoencoder: Any) -> None:
        """ConfigError unless ``autoencoder`` is the one this cache was encoded with (same identity hash)."""
        module = getattr(autoencoder, "module", autoencoder)
        if module in self._verified:
            return
        got = known_identity(module)["hash"]
        want = self.autoencoder_hash
        if got == want:
            self._verified.add(module)
        else:
            spec = self.manifest["autoencoder"].get("spec")
            raise ConfigError(f"autoencoder hash {got[:12]} differs from the one latent cache {self.dir} was encoded "
                              f"with ({want[:12]}, spec {json.dumps(spec)}): decode with that autoencoder or "
                              f"re-encode the cache with this one")

    def decode_latents(self, autoencoder: Any, z_normalised: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation and decode to pixels in [-1, 1] (checks the autoencoder hash first)."""
        self.check_autoencoder(autoencoder)
        module = getattr(autoencoder, "module", autoencoder)
        with torch.no_grad():
            return module.decode(denormalise(z_normalised, self.scale, self.shift))


def open_array(path: Path) -> np.ndarray:
    """np.load(mmap_mode='r') with a one-line CorruptDataError naming the file."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise CorruptDataError(f"cannot memory-map latent cache file {path} ({e}); rerun encode_latents.py with "
                               f"overwrite=true") from e


def _open_any(cache_dir: str | Path) -> LatentCache:
    """A memory-mapped cache, or a shard directory (object-storage URL or ``"layout": "shards"`` manifest)."""
    from difflab.latents import shards

    if shards.is_url(cache_dir):
        return shards.LatentShards(cache_dir, check_index=False)
    manifest = read_manifest(Path(cache_dir).expanduser())
    if manifest is not None and manifest.get("layout") == shards.LAYOUT:
        return shards.LatentShards(cache_dir, check_index=False)
    return LatentCache(cache_dir)


@config_target
def load_cache_autoencoder(cache_dir: str | Path) -> NormalisedAutoencoder:
    """The frozen autoencoder a cache (or shard directory) was encoded with, reloaded from its recorded spec,
    verified by hash, and wrapped to decode the cache's normalised latents. Latent DiffusionModules take it as
    ``autoencoder``."""
    from difflab.autoencoders.loading import load_autoencoder
    from difflab.utils.errors import ConfigError

    cache = _open_any(cache_dir)
    spec = (cache.manifest.get("autoencoder") or {}).get("spec")
    if not spec:
        raise ConfigError(f"latent cache {cache.dir} records no reload spec for its autoencoder; re-encode it with "
                          f"encode_latents.py from a saved autoencoder checkpoint")
    module, _ = load_autoencoder(spec, source=f"{cache.dir}/{MANIFEST}")
    cache.check_autoencoder(module)
    return NormalisedAutoencoder(module, cache.scale, cache.shift)
