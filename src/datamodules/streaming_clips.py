"""Captioned video clips as litdata shards: written by ``prepare_clips.py`` (``prepare_clip_shards``) from any video
datamodule (moving_digits, sign_video / how2sign / phoenix), read back by ``datamodule=clips_stream``
(``StreamingClipDataModule``) from a local directory or object storage (s3://, gs://, azure://, r2://).

Layout of a clip-shard directory (the latent shards' layout, ``difflab.latents.shards``, with other records)::

    manifest.json              ``"format": "difflab-clip-shards"``, ``"version": 1``, the source datamodule's
                               description (``dataset``: class and content-defining arguments), the clip geometry
                               (``sample_shape`` C x T x H x W, ``frames``, ``fps``, ``frame_stride``), ``prompts``,
                               per-split counts and a ``"shards"`` block (format, version, library, samples per shard,
                               write-order seed)
    <split>/index.json         litdata's index of the split's shards
    <split>/chunk-<p>-0.bin    shard p

Each sample is one record ``{"video": uint8 T x H x W x C, "index": int, "text": str}``: the clip exactly as the
datamodule serves it for evaluation (its ``num_frames`` window, centred in the clip, at its resolution and
channels), stored as 8-bit frames (the datamodules' float clips are 8-bit frames mapped to [-1, 1], so nothing is
lost). ``index`` is the clip's row in the source split. The training-time random window of the source datamodule is
traded for one fixed window per clip: shards hold only the frames a model sees, so reading them needs no decoder and
no per-clip seeking (see the README). Unreadable source clips are replaced by the datamodule's own rule (the next
readable clip) and counted in the manifest's ``data_report``.

Writing order, resume and shard size come from ``difflab.storage.litdata_shards.write_split``: a seeded permutation of the
split, a manifest update after every shard, a rerun of the same command continues an interrupted one. Reading uses
the latent reader's loader (``difflab.datamodules.streaming_latents``): seeded per-epoch shuffles, DDP ranks and
workers without overlap, mid-epoch resume from Lightning checkpoints.

litdata is an optional extra: ``pip install 'difflab[stream]'``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch

from difflab.autoencoders.loading import to_plain
from difflab.datamodules.streaming_latents import (
    HAVE_LITDATA,
    LatentStreamingDataset,
    ShardLoader,
    ShardSplitLoaders,
    stream_seed,
    world_size,
)
from difflab.latents.encode import describe_datamodule, split_dataset
from difflab.storage.litdata_shards import (
    auto_samples_per_shard,
    check_shards_complete,
    check_split_index,
    shard_info,
    shard_manifest,
    write_order,
    write_split,
)
from difflab.storage.location import INSTALL, fetch_json, is_url, join, require_litdata
from difflab.storage.manifest import (
    MANIFEST,
    STATUS_COMPLETE,
    STATUS_IN_PROGRESS,
    check_manifest_data,
    clear_cache,
    now,
    write_manifest,
)
from difflab.storage.progress import progress_bar
from difflab.utils.errors import ConfigError, CorruptDataError, DataNotFoundError
from difflab.utils.images import to_uint8

CLIP_FORMAT = "difflab-clip-shards"
CLIP_VERSION = 1
VIDEO_LAYOUT = "THWC"  # each record's "video": uint8 frames x height x width x channels
RECORD_KEYS = ["video", "index", "text"]
WRITER = "prepare_clips.py"
LOCATION_KEYS = frozenset({"data_dir"})  # source settings that say where the data was, not what it is


# ---------------------------------------------------------------------------------------------- manifest
def check_clip_manifest(manifest: dict | None, location: str) -> dict:
    """The manifest of a finished clip-shard directory, or a one-line error saying why it cannot be read."""
    rewrite = f"rewrite it with python {WRITER} datamodule=... out_dir={location} overwrite=true"
    if manifest is None:
        raise DataNotFoundError(
            f"no clip shards at {location} ({MANIFEST} missing): write them with python "
            f"{WRITER} datamodule=<moving_digits|how2sign|phoenix|sign_video> out_dir={location}"
        )
    if not isinstance(manifest, dict):
        raise CorruptDataError(f"{join(location, MANIFEST)} is not a difflab clip-shard manifest")
    fmt = manifest.get("format")
    if fmt == "difflab-latent-cache":
        raise ConfigError(
            f"{location} holds latents, not video clips: read it with datamodule=latents_stream (or datamodule=latents)"
        )
    if fmt != CLIP_FORMAT:
        raise CorruptDataError(
            f"{join(location, MANIFEST)} is not a difflab clip-shard manifest (format {fmt!r}, "
            f"expected {CLIP_FORMAT!r})"
        )
    if manifest.get("version") != CLIP_VERSION:
        raise CorruptDataError(
            f"{location} holds clip shards of format version {manifest.get('version')}, this "
            f"difflab reads version {CLIP_VERSION}: {rewrite}"
        )
    check_shards_complete(
        manifest,
        location,
        CLIP_FORMAT,
        CLIP_VERSION,
        rewrite,
        what="clip shards",
        rerun=f"python {WRITER} with out_dir={location}",
    )
    return check_manifest_data(manifest, join(location, MANIFEST))


class ClipShards:
    """A finished clip-shard directory opened for reading: manifest, geometry and split locations."""

    def __init__(self, location: str | Path, storage_options: dict | None = None, check_index: bool = True):
        self.location = str(location) if is_url(location) else str(Path(location).expanduser())
        self.storage_options = storage_options
        self.manifest = check_clip_manifest(fetch_json(self.location, MANIFEST, storage_options), self.location)
        if check_index:
            for split in self.splits:
                check_split_index(self.manifest, self.location, split, storage_options, writer=WRITER)

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def count(self, split: str) -> int:
        return int(self.manifest["splits"][split]["count"])

    def split_location(self, split: str) -> str:
        if split not in self.manifest["splits"]:
            raise ConfigError(f"clip shards {self.location} have no split {split!r} (they have {self.splits})")
        return join(self.location, split)

    def layout_identity(self, split: str) -> dict:
        """What a saved reading position depends on: the split's size and shard layout."""
        info = shard_info(self.manifest)
        return {
            "split": split,
            "count": self.count(split),
            "samples_per_shard": info["samples_per_shard"],
            "order_seed": info.get("order_seed"),
        }


def open_clip_shards(location: str | Path, storage_options: dict | None = None) -> ClipShards:
    """Open a finished clip-shard directory (local path or object-storage URL), checking manifest and indexes."""
    return ClipShards(location, storage_options)


# ---------------------------------------------------------------------------------------------- writing
def clip_frames(x: torch.Tensor) -> np.ndarray:
    """Float clips ``B x C x T x H x W`` in [-1, 1] (8-bit frames mapped by ``(u / 127.5) - 1``) back to their uint8
    ``B x T x H x W x C`` frames, exactly (through the project's one quantiser, ``utils.images.to_uint8``)."""
    return np.ascontiguousarray(to_uint8(x).permute(0, 2, 3, 4, 1).cpu().numpy())


def _read_clip_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptDataError(f"{path} is unreadable ({e}); rerun {WRITER} with overwrite=true") from e
    return check_manifest_data(manifest, path) if isinstance(manifest, dict) else manifest


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> dict | None:
    """The existing manifest of ``out_dir`` to resume (None: start fresh); clears it with ``overwrite``."""
    old = _read_clip_manifest(out_dir) if out_dir.exists() else None
    if old is not None and (not isinstance(old, dict) or old.get("format") != CLIP_FORMAT):
        raise ConfigError(
            f"{out_dir} holds a {MANIFEST} that is not of clip shards: write the clips to a new or empty out_dir"
        )
    if old is not None and overwrite:
        clear_cache(out_dir, old)
        return None
    if old is None and out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(
            f"{out_dir} exists, is not empty and holds no {MANIFEST}: choose a new or empty out_dir for the clip shards"
        )
    return old


def _check_resumable(
    out_dir: Path, old: dict, dataset: dict, samples_per_shard: int | None, order_seed: int | None
) -> None:
    hint = "use a new out_dir or overwrite=true"
    info = shard_info(old)
    if old.get("version") != CLIP_VERSION or info.get("version") != CLIP_VERSION:
        raise ConfigError(f"{out_dir} holds clip shards of format version {old.get('version')}: {hint}")
    if old.get("dataset") != dataset:
        raise ConfigError(
            f"{out_dir} holds clips of another dataset ({old.get('dataset', {}).get('target')} "
            f"with other settings): {hint}"
        )
    if samples_per_shard is not None and int(samples_per_shard) != info["samples_per_shard"]:
        raise ConfigError(
            f"{out_dir} was written with {info['samples_per_shard']} clips per shard, this run asks "
            f"for {samples_per_shard}: {hint}"
        )
    if order_seed != info.get("order_seed"):
        raise ConfigError(
            f"{out_dir} was written with shard_seed={info.get('order_seed')}, this run uses {order_seed}: {hint}"
        )


def _split_dataset(datamodule: Any, split: str):
    """The split's dataset, serving the fixed (centred) ``num_frames`` window of every clip."""
    get = getattr(datamodule, "split_dataset", None)
    ds = get(split) if callable(get) else split_dataset(datamodule, split)
    if ds is None:
        raise ConfigError(f"{type(datamodule).__name__} has no {split!r} split")
    if hasattr(ds, "train"):
        ds.train = False  # the evaluation window (centred), not a random one: the same clip on every run
    return ds


def _geometry(datamodule: Any, first: dict) -> dict:
    c, t, h, w = (int(v) for v in first["x"].shape)
    args = getattr(datamodule, "clip_args", {}) or {}
    params = getattr(datamodule, "params", None)
    fps = args.get("target_fps") or getattr(params, "fps", None)
    return {
        "video_layout": VIDEO_LAYOUT,
        "sample_shape": [c, t, h, w],
        "frames": t,
        "height": h,
        "width": w,
        "channels": c,
        "fps": None if fps is None else float(fps),  # null: the source videos' own rates
        "frame_stride": args.get("frame_stride"),
        "window": "centre",
    }


def prepare_clip_shards(
    datamodule: Any,
    out_dir: str | Path,
    *,
    dataset: dict | None = None,
    splits: Sequence[str] = ("train", "val"),
    samples_per_shard: int | None = None,
    order_seed: int | None = 0,
    overwrite: bool = False,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Write (or finish) the clip shards of ``datamodule``'s ``splits`` under ``out_dir``; returns the manifest.

    ``dataset``: the datamodule's description (``difflab.latents.encode.describe_datamodule`` of its config),
    recorded and compared on resume. ``samples_per_shard``: clips per shard (None: about 64 MB of frames per shard).
    ``order_seed``: the seed of the write-order permutation (None keeps the source order). ``overwrite`` clears an
    existing clip-shard directory first; otherwise a rerun continues it (and refuses other settings).
    """
    from torch.utils.data import DataLoader, Subset
    from torch.utils.data._utils.collate import default_collate

    require_litdata(f"{WRITER} (clip shards)")
    splits = list(splits)
    if not splits:
        raise ConfigError("splits is empty: name at least one of train, val, test")
    dataset = dataset if dataset is not None else describe_datamodule(datamodule)
    dataset = json.loads(json.dumps(to_plain(dataset), sort_keys=True, default=str))
    out_dir = Path(out_dir).expanduser()
    old = _prepare_out_dir(out_dir, overwrite)
    if old is not None:
        _check_resumable(out_dir, old, dataset, samples_per_shard, order_seed)
        if old.get("status") == STATUS_COMPLETE and set(splits) <= set(old["splits"]):
            return old
    out_dir.mkdir(parents=True, exist_ok=True)

    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    datasets = {s: _split_dataset(datamodule, s) for s in splits}

    if old is not None:
        manifest = old
    else:
        first = datasets[splits[0]][0]
        manifest = {
            "format": CLIP_FORMAT,
            "version": CLIP_VERSION,
            "status": STATUS_IN_PROGRESS,
            "created": now(),
            "dataset": dataset,
            **_geometry(datamodule, first),
            "splits": {},
            "count": {},
            "prompts": to_plain(getattr(datamodule, "prompts", None)),
            "num_classes": None,
            "class_names": None,
        }
        c, t, h, w = manifest["sample_shape"]
        s = samples_per_shard or auto_samples_per_shard((t, h, w, c), "uint8")
        manifest = shard_manifest(
            manifest, samples_per_shard=s, order_seed=order_seed, shard_format=CLIP_FORMAT, shard_version=CLIP_VERSION
        )
    for name, ds in datasets.items():
        n = len(ds)
        if name in manifest["splits"]:
            if manifest["splits"][name]["count"] != n:
                raise ConfigError(
                    f"clip shards {out_dir} split {name!r} have {manifest['splits'][name]['count']} "
                    f"clips, the dataset now has {n}: use a new out_dir or overwrite=true"
                )
            continue
        manifest["splits"][name] = {
            "count": n,
            "done": 0,
            "has_label": False,
            "has_text": True,
            "record_keys": list(RECORD_KEYS),
            "shards": [],
        }
        manifest["count"][name] = n
    manifest["status"] = STATUS_IN_PROGRESS
    write_manifest(out_dir, manifest)

    def collate(items: list[dict]) -> dict:
        return {"x": default_collate([it["x"] for it in items]), "text": [str(it["text"]) for it in items]}

    with progress_bar(progress) as bar:
        for name in splits:
            ds, info = datasets[name], manifest["splits"][name]
            order = write_order(info["count"], shard_info(manifest).get("order_seed"))

            def blocks(start: int, ds=ds, order=order):
                loader = DataLoader(
                    Subset(ds, order[start:].tolist()),
                    batch_size=int(batch_size),
                    shuffle=False,
                    num_workers=int(num_workers),
                    collate_fn=collate,
                )
                for batch in loader:
                    yield clip_frames(batch["x"]), None, batch["text"]

            write_split(out_dir, manifest, name, blocks, dtype="uint8", progress=bar, key="video")
    report = getattr(datamodule, "data_report", None)
    if callable(report):
        manifest["data_report"] = to_plain(report())
    manifest["status"] = STATUS_COMPLETE
    manifest["completed"] = now()
    write_manifest(out_dir, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------- reading
class ClipCollate:
    """Records -> one batch dict: uint8 frames to float ``B x C x T x H x W`` in [-1, 1] (the same arithmetic as
    ``sign_video.to_model_space``, so the values are the source datamodule's bit for bit)."""

    def __init__(self, return_index: bool):
        self.return_index = return_index

    def __call__(self, items: list[dict]) -> dict:
        v = np.stack([it["video"] for it in items])  # B x T x H x W x C uint8
        x = np.ascontiguousarray(v.transpose(0, 4, 1, 2, 3), dtype=np.float32)
        x /= 127.5
        x -= 1.0
        batch = {"x": torch.from_numpy(x), "text": [it["text"] for it in items]}
        if self.return_index:
            batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.int64)
        return batch


class StreamingClipDataModule(ShardSplitLoaders, L.LightningDataModule):
    """Captioned clips streamed from clip shards (``prepare_clips.py``) as the video datamodules' batches:
    ``{"x": B x C x T x H x W float32 in [-1, 1], "text": list[str]}`` (plus ``"index"``, the source rows, with
    ``return_index=True``). Attributes: ``sample_shape`` (C, T, H, W), ``num_frames``, ``image_size``, ``channels``,
    ``fps``, ``prompts``, ``num_classes=None``, ``class_names=None``.

    ``cache_dir``: the shard directory, a local path or an object-storage URL (read through litdata with
    ``storage_options``; downloaded shards go to ``download_dir``, at most ``max_cache_size`` at a time). ``seed``:
    the shuffle seed (else the run's global seed, else 0), the same on every rank. The loader is the latent reader's
    (``streaming_latents.ShardLoader``): seeded per-epoch order, DDP ranks and workers without overlap, resumable.

    Any other keyword is a setting of the source datamodule (an experiment's ``datamodule.num_frames=8``,
    ``canvas_size=16``, ...): it must equal what the shards were prepared with, else a one-line ConfigError.
    ``data_dir`` (where the source data was) is ignored.
    """

    def __init__(
        self,
        cache_dir: str,
        batch_size: int = 8,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int | None = None,
        download_dir: str | None = None,
        max_cache_size: str | None = "50GB",
        storage_options: dict | None = None,
        return_index: bool = False,
        **expected: Any,
    ):
        super().__init__()
        if not HAVE_LITDATA:
            raise ConfigError(
                f"datamodule=clips_stream needs the optional package litdata: {INSTALL} (or pip install litdata)"
            )
        self.storage_options = dict(storage_options) if storage_options else None
        self.shards = open_clip_shards(cache_dir, self.storage_options)
        m = self.shards.manifest
        self._check_expected(expected)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.pin_memory, self.persistent_workers = pin_memory, bool(persistent_workers) and num_workers > 0
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.download_dir, self.max_cache_size, self.return_index = download_dir, max_cache_size, bool(return_index)
        self.sample_shape = tuple(int(v) for v in m["sample_shape"])
        self.channels, self.num_frames = self.sample_shape[0], self.sample_shape[1]
        self.image_size = tuple(self.sample_shape[2:])
        self.fps = m.get("fps")
        self.prompts = m.get("prompts")
        self.num_classes, self.class_names = None, None

    def _check_expected(self, expected: dict) -> None:
        recorded = self.shards.manifest.get("dataset", {}) or {}
        args = recorded.get("args", {}) or {}
        for key, value in expected.items():
            if key in LOCATION_KEYS:
                continue
            if key not in args:
                raise ConfigError(
                    f"datamodule.{key} is neither a setting of StreamingClipDataModule nor one the clip "
                    f"shards at {self.shards.location} were prepared with (from "
                    f"{recorded.get('target')}): drop it with ~datamodule.{key}"
                )
            want = json.loads(json.dumps(to_plain(value), default=str))
            if want != args[key]:
                raise ConfigError(
                    f"datamodule.{key}={json.dumps(want)} but the clip shards at "
                    f"{self.shards.location} were prepared with {key}={json.dumps(args[key])}: prepare "
                    f"shards with that setting (python {WRITER} ...) or drop it with ~datamodule.{key}"
                )

    def dataset(self, split: str, train: bool | None = None):
        """A fresh streaming dataset over ``split`` (shuffled when ``train`` and ``shuffle``)."""
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
            tag_epoch=False,
        )

    def loader(self, split: str, train: bool):
        ds = self.dataset(split, train)
        drop_last = True if world_size() > 1 else bool(self.drop_last and train)
        generator = torch.Generator().manual_seed(stream_seed(self.seed))  # never the global RNG (see the latents)
        return ShardLoader(
            ds,
            layout=self.shards.layout_identity(split),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=drop_last,
            collate_fn=ClipCollate(self.return_index),
            generator=generator,
        )
