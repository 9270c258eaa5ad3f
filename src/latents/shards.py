"""Sharded latent datasets: a latent cache's content as litdata shards, for sets too large for one local memory map
or kept in object storage (s3://, gs://, azure://, r2://). The memory-mapped cache (``difflab.latents.cache``)
stays the default; ``encode_latents.py format=shards`` (or ``cache_to_shards``) writes this layout instead.

Layout of a shard directory::

    manifest.json              the latent cache manifest (autoencoder identity and hash, dataset, normalisation,
                               counts), plus ``"layout": "shards"`` and a ``"shards"`` block: shard format name and
                               version, library and its version, samples per shard, write-order seed
    <split>/index.json         litdata's index of the split's shards
    <split>/chunk-<p>-0.bin    shard p: write positions [p*S, (p+1)*S) of the split, S samples per shard

Each sample is one record ``{"z": raw latent (C x h x w, storage dtype), "index": its row in the source split,
"label": int?, "text": str?}``: latents are stored raw, as in the cache, and normalised on reading with the
manifest's affine map. The write order is a seeded permutation of the source split (``order_seed``; null keeps the
source order), so every shard is a uniform random subset even when the source is sorted by class: litdata shuffles
within shards (and shuffles the shard order), so a class-sorted shard would give single-class batches.

Writing is resumable at shard boundaries: the manifest records every finished shard (with its per-channel moments,
from which the normalisation is computed without reading the shards again); rerunning the same command removes
the unfinished shard's files and continues. ``open_shards`` (``difflab.latents.shard_reader``) refuses a directory from another cache or shard format
version, or whose shard index disagrees with its manifest, in one line.

litdata is an optional extra: ``pip install 'difflab[stream]'``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data._utils.collate import default_collate

from difflab.autoencoders.loading import known_identity, to_plain
from difflab.latents.cache import LatentCache
from difflab.latents.encode import (
    DTYPES,
    check_compatible,
    describe_datamodule,
    encode_batch,
    ready_to_encode,
    same_normalisation,
)
from difflab.latents.format import VERSION, new_manifest, read_manifest
from difflab.latents.normalisation import channel_moments, normalisation
from difflab.latents.shard_reader import SHARD_FORMAT, SHARD_VERSION
from difflab.storage.litdata_shards import (
    LAYOUT,
    auto_samples_per_shard,
    shard_info,
    shard_manifest,
    write_order,
    write_split,
)
from difflab.storage.location import require_litdata
from difflab.storage.manifest import MANIFEST, STATUS_COMPLETE, STATUS_IN_PROGRESS, clear_cache, now, write_manifest
from difflab.storage.progress import progress_bar
from difflab.utils.errors import ConfigError


def moments_of(z: np.ndarray) -> dict:
    """What a latent shard records: the count and per-channel mean and variance of its latents."""
    mean, var, n = channel_moments(z)
    return {"n": int(n), "mean": mean.tolist(), "var": var.tolist()}


def combine_moments(parts: Iterable[dict]) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, variance, count) per channel of the union of shards from their own moments (Chan et al.)."""
    n, mean, m2 = 0, None, None
    for p in parts:
        nb, mb = int(p["n"]), np.asarray(p["mean"], np.float64)
        m2b = np.asarray(p["var"], np.float64) * nb
        if mean is None:
            n, mean, m2 = nb, mb, m2b
            continue
        tot = n + nb
        delta = mb - mean
        mean = mean + delta * nb / tot
        m2 = m2 + m2b + delta**2 * n * nb / tot
        n = tot
    if not n:
        raise ConfigError("cannot compute latent statistics over an empty train split")
    return mean, m2 / n, n


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> dict | None:
    """The existing manifest of ``out_dir`` to resume (None: start fresh); clears it with ``overwrite``."""
    old = read_manifest(out_dir) if out_dir.exists() else None
    if old is not None and overwrite:
        clear_cache(out_dir, old)
        return None
    if old is None and out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(
            f"{out_dir} exists, is not empty and holds no {MANIFEST}: choose a new or empty out_dir for the shards"
        )
    if old is not None and old.get("layout") != LAYOUT:
        raise ConfigError(
            f"{out_dir} holds a memory-mapped latent cache: write the shards to another out_dir (or overwrite=true)"
        )
    return old


def _check_layout(out_dir: Path, old: dict, samples_per_shard: int | None, order_seed: int | None) -> None:
    info = shard_info(old)
    hint = "use a new out_dir or overwrite=true"
    if info.get("version") != SHARD_VERSION or old.get("version") != VERSION:
        raise ConfigError(f"{out_dir} holds shards of another format version: {hint}")
    if samples_per_shard is not None and int(samples_per_shard) != info["samples_per_shard"]:
        raise ConfigError(
            f"{out_dir} was written with {info['samples_per_shard']} samples per shard, this run asks "
            f"for {samples_per_shard}: {hint}"
        )
    if order_seed != info.get("order_seed"):
        raise ConfigError(
            f"{out_dir} was written with shard_seed={info.get('order_seed')}, this run uses {order_seed}: {hint}"
        )


def _finish(out_dir: Path, manifest: dict, target_std: float, per_channel: bool) -> dict:
    mean, var, _ = combine_moments(manifest["splits"]["train"]["shards"])
    manifest["transform"] = normalisation(mean, var, target_std, per_channel)
    manifest["status"] = STATUS_COMPLETE
    manifest["completed"] = now()
    write_manifest(out_dir, manifest)
    return manifest


def cache_to_shards(
    cache_dir: str | Path,
    out_dir: str | Path,
    *,
    samples_per_shard: int | None = None,
    order_seed: int | None = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write the content of a finished memory-mapped cache as shards (same manifest, same normalisation); returns
    the shard manifest. Resumable like ``encode_dataset_shards``."""
    cache = LatentCache(cache_dir)
    out_dir = Path(out_dir).expanduser()
    old = _prepare_out_dir(out_dir, overwrite)
    if old is not None:
        _check_layout(out_dir, old, samples_per_shard, order_seed)
        if old["status"] == STATUS_COMPLETE:
            return old
        manifest = old
    else:
        s = samples_per_shard or auto_samples_per_shard(cache.latent_shape, cache.manifest["latent_dtype"])
        manifest = shard_manifest(
            cache.manifest,
            samples_per_shard=s,
            order_seed=order_seed,
            shard_format=SHARD_FORMAT,
            shard_version=SHARD_VERSION,
        )
        manifest.update(status=STATUS_IN_PROGRESS, created=now(), source_cache=str(cache.dir))
        for info in manifest["splits"].values():
            info.update(done=0, shards=[])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(out_dir, manifest)
    s = int(shard_info(manifest)["samples_per_shard"])
    with progress_bar(progress) as bar:
        for split in cache.splits:
            lat, lab_path, texts = cache.open_latents(split), cache.labels_path(split), cache.texts(split)
            labels = np.load(lab_path, mmap_mode="r") if lab_path is not None else None
            order = write_order(cache.count(split), shard_info(manifest).get("order_seed"))

            def blocks(start: int, lat=lat, labels=labels, texts=texts, order=order):
                for i in range(start, len(order), s):
                    idx = order[i : i + s]
                    rows = np.sort(idx)  # read the rows in file order, then put them in write order
                    pos = np.searchsorted(rows, idx)
                    z = np.asarray(lat[rows])[pos]
                    yield (
                        z,
                        None if labels is None else np.asarray(labels[rows])[pos],
                        None if texts is None else [texts[j] for j in idx.tolist()],
                    )

            write_split(
                out_dir, manifest, split, blocks, dtype=manifest["latent_dtype"], progress=bar, stats=moments_of
            )
    manifest["status"] = STATUS_COMPLETE
    manifest["completed"] = now()
    write_manifest(out_dir, manifest)  # the cache's own normalisation, unchanged
    return manifest


def encode_dataset_shards(
    autoencoder,
    datamodule,
    out_dir: str | Path,
    *,
    identity: dict | None = None,
    dataset: dict | None = None,
    splits: Sequence[str] = ("train", "val"),
    batch_size: int = 256,
    dtype: str = "float16",
    target_std: float = 0.5,
    per_channel: bool = True,
    overwrite: bool = False,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    samples_per_shard: int | None = None,
    order_seed: int | None = 0,
) -> dict:
    """``encode_dataset`` writing shards instead of memory maps (see the module docstring); returns the manifest.

    Same arguments and rules as ``difflab.latents.encode.encode_dataset`` (identity, dataset description, resume,
    refusal to mix autoencoders or datasets), plus ``samples_per_shard`` (None: about 64 MB of latents per shard) and
    ``order_seed`` (the seed of the write-order permutation; None keeps the source order).
    """
    require_litdata("encode_latents.py format=shards")
    if dtype not in DTYPES:
        raise ConfigError(f"latent dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    splits = list(splits)
    if "train" not in splits:
        raise ConfigError(f"splits must include 'train' (normalisation statistics come from it); got {splits}")
    autoencoder = getattr(autoencoder, "module", autoencoder)
    identity = dict(identity or known_identity(autoencoder))
    dataset = dataset if dataset is not None else describe_datamodule(datamodule)
    dataset = json.loads(json.dumps(to_plain(dataset), sort_keys=True, default=str))
    out_dir = Path(out_dir).expanduser()

    old = _prepare_out_dir(out_dir, overwrite)
    if old is not None:
        check_compatible(out_dir, old, identity, dataset, dtype)
        _check_layout(out_dir, old, samples_per_shard, order_seed)
        if old["status"] == STATUS_COMPLETE and set(splits) <= set(old["splits"]):
            if same_normalisation(old, target_std, per_channel):
                return old
            return _finish(out_dir, old, target_std, per_channel)  # moments are recorded
    out_dir.mkdir(parents=True, exist_ok=True)

    device, datasets = ready_to_encode(autoencoder, datamodule, splits, device)

    if old is not None:
        manifest = old
    else:
        manifest = new_manifest(identity, dataset, dtype, batch_size)
        first = default_collate([datasets["train"][0]])
        manifest["pixel_shape"] = list(first["x"].shape[1:])
        manifest["latent_shape"] = list(encode_batch(autoencoder, first["x"], device).shape[1:])
        for key in ("num_classes", "class_names", "prompts"):
            manifest[key] = to_plain(getattr(datamodule, key, None))
        s = samples_per_shard or auto_samples_per_shard(manifest["latent_shape"], dtype)
        manifest = shard_manifest(
            manifest, samples_per_shard=s, order_seed=order_seed, shard_format=SHARD_FORMAT, shard_version=SHARD_VERSION
        )
    for s_name, ds in datasets.items():
        n = len(ds)
        if s_name in manifest["splits"]:
            if manifest["splits"][s_name]["count"] != n:
                raise ConfigError(
                    f"shards {out_dir} split {s_name!r} have {manifest['splits'][s_name]['count']} "
                    f"samples, the dataset now has {n}: use a new out_dir or overwrite=true"
                )
            continue
        item = ds[0]
        manifest["splits"][s_name] = {
            "count": n,
            "done": 0,
            "has_label": "label" in item,
            "has_text": "text" in item,
            "shards": [],
        }
        manifest["count"][s_name] = n
    manifest["status"] = STATUS_IN_PROGRESS
    write_manifest(out_dir, manifest)

    with progress_bar(progress) as bar:
        for s_name in splits:
            ds, info = datasets[s_name], manifest["splits"][s_name]
            order = write_order(info["count"], shard_info(manifest).get("order_seed"))

            def blocks(start: int, ds=ds, order=order):
                loader = DataLoader(
                    Subset(ds, order[start:].tolist()),
                    batch_size=batch_size,
                    shuffle=False,
                    num_workers=num_workers,
                    collate_fn=default_collate,
                )
                for batch in loader:
                    z = encode_batch(autoencoder, batch["x"], device)
                    yield z, batch.get("label"), batch.get("text")

            write_split(out_dir, manifest, s_name, blocks, dtype=dtype, progress=bar, stats=moments_of)
    return _finish(out_dir, manifest, target_std, per_channel)
