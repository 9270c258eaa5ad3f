"""Encode a datamodule's splits once with a frozen autoencoder and write a resumable latent cache.

``encode_dataset`` writes chunk by chunk into pre-allocated ``.npy`` memory maps and records progress in the
manifest after every chunk, so an interrupted run continues where it stopped when rerun with the same arguments.
It refuses to add to a cache written by another autoencoder or from another dataset.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data._utils.collate import default_collate

from difflab.autoencoders.loading import class_path, known_identity, to_plain
from difflab.latents.format import LABELS, LATENTS, TEXTS, TEXTS_PARTIAL, new_manifest, read_manifest
from difflab.latents.normalisation import channel_moments, normalisation
from difflab.ops.atomic import write_text
from difflab.storage.manifest import (
    MANIFEST,
    STATUS_COMPLETE,
    STATUS_IN_PROGRESS,
    clear_cache,
    now,
    split_dir,
    write_manifest,
)
from difflab.storage.progress import progress_bar
from difflab.trust import not_a_link
from difflab.utils.errors import ConfigError, disk_full, is_disk_full

# Datamodule arguments that change how data is loaded, not what the data is: not part of the dataset identity.
LOADER_KEYS = frozenset(
    {"batch_size", "num_workers", "pin_memory", "persistent_workers", "data_dir", "prefetch_factor"}
)
DTYPES = {"float16": np.float16, "float32": np.float32}


def describe_datamodule(cfg_or_dm: Any) -> dict:
    """{target, args} identifying a dataset: the datamodule class and its content-defining arguments.

    Accepts a Hydra config (``_target_`` + args) or a datamodule object (its class and saved ``hparams``).
    Loader settings and ``data_dir`` (a location) are left out so moving data or changing workers keeps the cache.
    """
    cfg = to_plain(cfg_or_dm)
    if isinstance(cfg, dict):
        target, args = cfg.get("_target_"), cfg
    else:
        target, args = class_path(cfg_or_dm), dict(getattr(cfg_or_dm, "hparams", {}) or {})
    args = {k: to_plain(v) for k, v in args.items() if k not in LOADER_KEYS and not k.startswith("_")}
    return json.loads(json.dumps({"target": target, "args": args}, sort_keys=True, default=str))


def same_normalisation(manifest: dict, target_std: float, per_channel: bool) -> bool:
    """Whether a written cache's normalisation is the one asked for (else only the transform is recomputed)."""
    transform = manifest.get("transform")
    return (
        bool(transform)
        and transform["target_std"] == float(target_std)
        and transform["per_channel"] == bool(per_channel)
    )


def ready_to_encode(autoencoder: Any, datamodule: Any, splits: Sequence[str], device=None):
    """Put the autoencoder in eval mode on ``device`` (default: its own) and set the datamodule up; returns the
    device and each split's dataset. Shared by the memory-mapped and the sharded writers."""
    device = torch.device(device) if device is not None else _device_of(autoencoder)
    autoencoder.to(device).eval()
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    if hasattr(datamodule, "setup"):
        datamodule.setup("fit")
        if "test" in splits:
            datamodule.setup("test")
    return device, {s: split_dataset(datamodule, s) for s in splits}


def split_dataset(datamodule: Any, split: str) -> Dataset:
    """The un-shuffled dataset of a split: ``datamodule.dataset(split)`` or a ``<split>_set``/``<split>_dataset``
    attribute (set up first with ``setup``)."""
    if callable(getattr(datamodule, "dataset", None)):
        return datamodule.dataset(split)
    for name in (f"{split}_set", f"{split}_dataset", f"data_{split}"):
        ds = getattr(datamodule, name, None)
        if ds is not None:
            return ds
    raise ConfigError(
        f"{class_path(datamodule)} exposes no dataset for split {split!r}: give it a "
        f"'{split}_set' attribute (set in setup) or a dataset(split) method"
    )


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def check_compatible(out_dir: Path, old: dict, identity: dict, dataset: dict, dtype: str) -> None:
    """ConfigError naming what differs between an existing cache and this run."""
    hint = "use a new out_dir or overwrite=true"
    if old["autoencoder"]["hash"] != identity["hash"]:
        raise ConfigError(
            f"latent cache {out_dir} was written with autoencoder {old['autoencoder']['class']} hash "
            f"{old['autoencoder']['hash'][:12]}, this run's is {identity['class']} hash "
            f"{identity['hash'][:12]}: {hint}"
        )
    if old["dataset"] != dataset:
        raise ConfigError(
            f"latent cache {out_dir} was written from dataset {json.dumps(old['dataset'])}, this run "
            f"uses {json.dumps(dataset)}: {hint}"
        )
    if old["latent_dtype"] != dtype:
        raise ConfigError(
            f"latent cache {out_dir} stores {old['latent_dtype']} latents, this run asks for {dtype}: {hint}"
        )


def encode_batch(autoencoder, x: torch.Tensor, device: torch.device) -> np.ndarray:
    """Raw latents of one pixel batch as a float32 array (no gradients)."""
    with torch.inference_mode():
        z = autoencoder.encode(x.to(device, non_blocking=True))
    return z.float().cpu().numpy()


def _open_text_log(path: Path, keep: int) -> list[str]:
    """Lines of the partial text log truncated to the first ``keep`` (entries past the recorded progress)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    if len(lines) < keep:
        raise ConfigError(
            f"{path} holds {len(lines)} prompts but the manifest records {keep} encoded samples; the "
            f"cache is damaged: rerun with overwrite=true"
        )
    lines = lines[:keep]
    write_text(path, "".join(line + "\n" for line in lines))
    return lines


def open_map(path: Path, fresh: bool, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A writable memory map of a cache file: created with all its blocks reserved when ``fresh`` (a full disk then
    fails here, in one line, instead of killing the process with SIGBUS at a later write into a sparse file), else
    the existing file. A symbolic link at ``path`` is refused."""
    if not fresh:
        return np.lib.format.open_memmap(not_a_link(path), mode="r+")
    array = np.lib.format.open_memmap(not_a_link(path), mode="w+", dtype=dtype, shape=shape)
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate: sparse, as before
            return array
        array = None  # unmap before removing the file
        path.unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full(path, err) from None
        raise
    return array


def encode_split(
    autoencoder,
    dataset: Dataset,
    out_dir: Path,
    split: str,
    manifest: dict,
    *,
    batch_size: int,
    dtype: str,
    num_workers: int,
    device: torch.device,
    progress=None,
) -> None:
    """Encode samples [done, N) of one split into its memory maps, saving progress after every chunk."""
    info = manifest["splits"][split]
    n, done = info["count"], info["done"]
    sdir = split_dir(out_dir, split)
    shape = (n, *manifest["latent_shape"])
    lat_path, lab_path, txt_path = sdir / LATENTS, sdir / LABELS, sdir / TEXTS_PARTIAL
    if n and done >= n and (not info["has_text"] or (sdir / TEXTS).is_file()):
        return  # finished earlier
    fresh = done == 0  # nothing recorded yet: (re)create the files
    for path, needed in ((lat_path, True), (lab_path, info["has_label"])):
        if not fresh and needed and not path.is_file():
            raise ConfigError(
                f"{path} is missing but the manifest records {done} encoded samples: the cache is "
                f"damaged, rerun with overwrite=true"
            )
    latents = open_map(lat_path, fresh, DTYPES[dtype], shape)
    if latents.shape != shape or latents.dtype != DTYPES[dtype]:
        raise ConfigError(
            f"{lat_path} has shape {latents.shape} {latents.dtype}, expected {shape} {dtype}: the cache "
            f"is damaged, rerun with overwrite=true"
        )
    labels = None
    if info["has_label"]:
        labels = open_map(lab_path, fresh, np.int64, (n,))
    if info["has_text"]:
        _open_text_log(txt_path, done)
    task = progress.add_task(split, total=n, completed=done) if progress is not None else None
    if done < n:
        loader = DataLoader(
            Subset(dataset, range(done, n)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=default_collate,
        )
        for batch in loader:
            z = encode_batch(autoencoder, batch["x"], device)
            b = len(z)
            latents[done : done + b] = z.astype(latents.dtype)
            latents.flush()
            if labels is not None:
                labels[done : done + b] = np.asarray(batch["label"], dtype=np.int64)
                labels.flush()
            if info["has_text"]:
                with open(not_a_link(txt_path), "a") as f:
                    f.writelines(json.dumps(t) + "\n" for t in batch["text"])
            done += b
            info["done"] = done
            write_manifest(out_dir, manifest)  # after the data: a crash redoes at most this chunk
            if task is not None:
                progress.update(task, completed=done)
    del latents, labels
    if info["has_text"] and txt_path.is_file():
        texts = [json.loads(line) for line in txt_path.read_text().splitlines()]
        write_text(sdir / TEXTS, json.dumps(texts))
        txt_path.unlink()


def encode_dataset(
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
) -> dict:
    """Write (or finish) the latent cache of ``datamodule``'s splits in ``out_dir``; returns the manifest.

    ``identity`` defaults to the autoencoder's (``load_autoencoder`` attaches one with a reload ``spec``);
    ``dataset`` defaults to ``describe_datamodule(datamodule)``. Latents are posterior means. Normalisation
    statistics come from the train split. An existing cache with the same autoencoder and dataset is resumed (or
    left as is when complete); a different one raises ConfigError unless ``overwrite=True``.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"latent dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    splits = list(splits)
    if "train" not in splits:
        raise ConfigError(f"splits must include 'train' (normalisation statistics come from it); got {splits}")
    autoencoder = getattr(autoencoder, "module", autoencoder)  # unwrap Frozen
    identity = dict(identity or known_identity(autoencoder))
    dataset = dataset if dataset is not None else describe_datamodule(datamodule)
    dataset = json.loads(json.dumps(to_plain(dataset), sort_keys=True, default=str))
    out_dir = Path(out_dir).expanduser()

    old = read_manifest(out_dir) if out_dir.exists() else None
    if old is not None and overwrite:
        clear_cache(out_dir, old)
        old = None
    elif old is None and out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(
            f"{out_dir} exists, is not empty and holds no {MANIFEST}: choose a new or empty out_dir "
            f"for the latent cache"
        )
    if old is not None:
        check_compatible(out_dir, old, identity, dataset, dtype)
        if (
            old["status"] == STATUS_COMPLETE
            and set(splits) <= set(old["splits"])
            and same_normalisation(old, target_std, per_channel)
        ):
            return old  # nothing to do
    out_dir.mkdir(parents=True, exist_ok=True)

    device, datasets = ready_to_encode(autoencoder, datamodule, splits, device)

    manifest = old or new_manifest(identity, dataset, dtype, batch_size)
    if "latent_shape" not in manifest:
        first = default_collate([datasets["train"][0]])
        manifest["pixel_shape"] = list(first["x"].shape[1:])
        manifest["latent_shape"] = list(encode_batch(autoencoder, first["x"], device).shape[1:])
        for key in ("num_classes", "class_names", "prompts"):
            manifest[key] = to_plain(getattr(datamodule, key, None))
    for s, ds in datasets.items():
        n = len(ds)
        if s in manifest["splits"]:
            if manifest["splits"][s]["count"] != n:
                raise ConfigError(
                    f"latent cache {out_dir} split {s!r} has {manifest['splits'][s]['count']} samples, "
                    f"the dataset now has {n}: use a new out_dir or overwrite=true"
                )
            continue
        item = ds[0]
        manifest["splits"][s] = {"count": n, "done": 0, "has_label": "label" in item, "has_text": "text" in item}
        manifest["count"][s] = n
    manifest["status"] = STATUS_IN_PROGRESS
    write_manifest(out_dir, manifest)

    with progress_bar(progress) as bar:
        for s in splits:
            split_dir(out_dir, s).mkdir(exist_ok=True)
            encode_split(
                autoencoder,
                datasets[s],
                out_dir,
                s,
                manifest,
                batch_size=batch_size,
                dtype=dtype,
                num_workers=num_workers,
                device=device,
                progress=bar,
            )

    train = np.load(split_dir(out_dir, "train") / LATENTS, mmap_mode="r")
    mean, var, _ = channel_moments(train)
    del train
    manifest["transform"] = normalisation(mean, var, target_std, per_channel)
    manifest["status"] = STATUS_COMPLETE
    manifest["completed"] = now()
    write_manifest(out_dir, manifest)
    return manifest
