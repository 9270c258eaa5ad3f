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
the unfinished shard's files and continues. ``open_shards`` refuses a directory from another cache or shard format
version, or whose shard index disagrees with its manifest, in one line.

litdata is an optional extra: ``pip install 'difflab[stream]'``.
"""
from __future__ import annotations

import copy
import json
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from difflab.latents.cache import (FORMAT, MANIFEST, STATUS_COMPLETE, STATUS_IN_PROGRESS, VERSION, LatentCache,
                                   channel_moments, check_manifest_data, clear_cache, new_manifest, normalisation, now,
                                   read_manifest, split_dir, write_manifest)
from difflab.trust import bare_name
from difflab.utils.errors import (ConfigError, CorruptDataError, DataNotFoundError, UntrustedFileError, disk_full,
                                  is_disk_full)

LAYOUT = "shards"
SHARD_FORMAT = "difflab-latent-shards"
SHARD_VERSION = 1
INDEX = "index.json"                      # litdata's index of a split's shards
SHARD_BYTES = 64 * 2**20                  # default shard size: litdata's recommended ~64 MB chunks
URL_PREFIXES = ("s3://", "gs://", "gcs://", "azure://", "r2://", "hf://", "local:")
# What each record field is stored as (litdata's data_format names). The reader refuses any other format before
# litdata decodes a byte: litdata picks each field's decoder from the index, and "pickle" would run code.
FIELD_FORMATS = {"z": "numpy", "video": "numpy", "index": "int", "label": "int", "text": "str"}
CHUNK_NAME = r"chunk-[0-9]+-[0-9]+\.bin"   # litdata's names for difflab's shards (no compression)
INSTALL = "pip install 'difflab[stream]'"


# ---------------------------------------------------------------------------------------------- litdata
def require_litdata(needed_for: str):
    """Import litdata or raise a one-line ConfigError naming the extra that brings it."""
    try:
        import litdata
    except ImportError:
        raise ConfigError(f"{needed_for} needs the optional package litdata: {INSTALL} (or pip install litdata)") \
            from None
    return litdata


def is_url(location: str | Path) -> bool:
    """Whether ``location`` names object storage (read through litdata) rather than a local directory."""
    return str(location).startswith(URL_PREFIXES)


def join(location: str | Path, *parts: str) -> str:
    """``location/part/...`` for a local path or a URL (Path would fold the ``//`` of ``s3://``)."""
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location).expanduser().joinpath(*parts))


def _fetch_json(location: str, name: str, storage_options: dict | None = None) -> Any | None:
    """JSON file ``name`` under ``location`` (local or object storage), or None when it does not exist."""
    path = join(location, name)
    if not is_url(location):
        p = Path(path)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise CorruptDataError(f"{p} is unreadable ({e}); rewrite the shards with encode_latents.py "
                                   f"format=shards overwrite=true") from e
    require_litdata(f"reading {location}")
    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory(prefix="difflab_shards_") as tmp:
        local = str(Path(tmp) / Path(name).name)
        try:
            get_downloader(str(location), tmp, [], storage_options).download_file(path, local)
            text = Path(local).read_text()
        except Exception as e:  # a missing object is a provider-specific error (botocore ClientError, ...)
            first = str(e).splitlines()[0] if str(e) else ""
            if isinstance(e, FileNotFoundError) or any(w in first for w in ("404", "Not Found", "NoSuchKey")):
                return None
            raise DataNotFoundError(f"cannot read {path} ({type(e).__name__}: {first}); check the URL and the "
                                    f"storage credentials (datamodule.storage_options)") from e
    try:
        return json.loads(text)
    except ValueError as e:
        raise CorruptDataError(f"{path} is unreadable ({e}); rewrite the shards") from e


# ---------------------------------------------------------------------------------------------- manifest
def shard_info(manifest: dict) -> dict:
    return manifest.get("shards") or {}


def write_order(n: int, seed: int | None) -> np.ndarray:
    """The write order of a split: a permutation of range(n) seeded with ``seed`` (None: the source order)."""
    if seed is None:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng(int(seed)).permutation(n).astype(np.int64)


def auto_samples_per_shard(latent_shape: Sequence[int], dtype: str, shard_bytes: int = SHARD_BYTES) -> int:
    """Samples per shard so that a shard holds about ``shard_bytes`` of latents."""
    per_sample = int(np.prod(latent_shape)) * np.dtype(dtype).itemsize
    return max(1, int(shard_bytes) // per_sample)


def _moments_of(z: np.ndarray) -> dict:
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
        m2 = m2 + m2b + delta ** 2 * n * nb / tot
        n = tot
    if not n:
        raise ConfigError("cannot compute latent statistics over an empty train split")
    return mean, m2 / n, n


def _expected_keys(info: dict) -> list[str]:
    if info.get("record_keys"):  # other record layouts (difflab.datamodules.streaming_clips) list their keys
        return list(info["record_keys"])
    return ["z", "index"] + (["label"] if info.get("has_label") else []) + (["text"] if info.get("has_text") else [])


def _index_keys(index: dict) -> list[str] | None:
    """The record keys a litdata index declares (None when this litdata version writes them elsewhere)."""
    try:
        spec = json.loads(index["config"]["data_spec"])
        return json.loads(spec[1]["context"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def check_shard_manifest(manifest: dict | None, location: str) -> dict:
    """The manifest of a finished shard directory, or a one-line error saying why it cannot be read."""
    rewrite = "rewrite it with encode_latents.py format=shards overwrite=true"
    if manifest is None:
        raise DataNotFoundError(f"no sharded latent dataset at {location} ({MANIFEST} missing): write one with "
                                f"python encode_latents.py autoencoder=... datamodule=... format=shards "
                                f"out_dir={location}")
    if isinstance(manifest, dict) and manifest.get("format") == "difflab-clip-shards":  # prepare_clips.py
        raise ConfigError(f"{location} holds video clips, not latents: read it with datamodule=clips_stream")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptDataError(f"{join(location, MANIFEST)} is not a difflab latent cache manifest "
                               f"(format != {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise CorruptDataError(f"{location} is a latent cache of format version {manifest.get('version')}, this "
                               f"difflab reads version {VERSION}: {rewrite}")
    if manifest.get("layout") != LAYOUT:
        raise ConfigError(f"{location} is a memory-mapped latent cache, not shards: use datamodule=latents, or "
                          f"write shards with encode_latents.py format=shards")
    check_shards_complete(manifest, location, SHARD_FORMAT, SHARD_VERSION, rewrite, what="sharded latent dataset",
                          rerun=f"encode_latents.py with format=shards out_dir={location}")
    return check_manifest_data(manifest, join(location, MANIFEST))


def check_shards_complete(manifest: dict, location: str, shard_format: str, shard_version: int, rewrite: str,
                          what: str, rerun: str) -> None:
    """The manifest's shard block is ``shard_format`` / ``shard_version`` and every split is written; else one line
    (another format version: rewrite; an interrupted writer: rerun it)."""
    info = shard_info(manifest)
    if info.get("format") != shard_format or info.get("version") != shard_version:
        raise CorruptDataError(f"{location} holds shards of format {info.get('format')!r} version "
                               f"{info.get('version')}, this difflab reads {shard_format!r} version {shard_version}: "
                               f"{rewrite}")
    if manifest.get("status") != STATUS_COMPLETE:
        done = {s: f"{v.get('done', 0)}/{v.get('count', '?')}" for s, v in manifest.get("splits", {}).items()}
        raise ConfigError(f"{what} {location} is incomplete ({done}): rerun {rerun} to finish it")


def check_split_index(manifest: dict, location: str, split: str, storage_options: dict | None = None, *,
                      writer: str = "encode_latents.py format=shards") -> dict:
    """litdata's index of one split, checked against the manifest (count of samples, record keys); ``writer`` is
    the command named in the messages."""
    info = manifest["splits"][split]
    where = join(location, split, INDEX)
    index = _fetch_json(join(location, split), INDEX, storage_options)
    if index is None:
        raise CorruptDataError(f"{where} is missing: the shard directory is damaged, rewrite it with "
                               f"{writer} overwrite=true")
    try:
        count = sum(int(c["chunk_size"]) for c in index["chunks"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptDataError(f"{where} is not a litdata shard index ({e}); rewrite the shards") from e
    if count != int(info["count"]):
        raise CorruptDataError(f"{where} lists {count} samples but {join(location, MANIFEST)} records "
                               f"{info['count']} for split {split!r}: the manifest belongs to other shards; rewrite "
                               f"them with {writer} overwrite=true")
    keys = _index_keys(index)
    if keys is not None and keys != _expected_keys(info):
        raise CorruptDataError(f"{where} stores records {keys}, the manifest expects {_expected_keys(info)}: rewrite "
                               f"the shards with {writer} overwrite=true")
    check_index_safe(index, keys or _expected_keys(info), where)
    return index


def check_index_safe(index: dict, keys: list[str], where: str) -> None:
    """Refuse a litdata index that would make the reader run code or leave the split's directory: a field stored
    in a format difflab does not write (``FIELD_FORMATS``; "pickle" unpickles), encryption, or a chunk file name
    that is not a bare ``chunk-<p>-<n>.bin``."""
    config = index.get("config") if isinstance(index.get("config"), dict) else {}
    formats = config.get("data_format")
    if not isinstance(formats, list) or len(formats) != len(keys):
        raise UntrustedFileError(f"refusing {where}: its data_format {formats!r} does not describe the fields {keys}")
    for key, fmt in zip(keys, formats):
        if FIELD_FORMATS.get(key) != fmt:
            raise UntrustedFileError(f"refusing {where}: field {key!r} is stored as {fmt!r}; difflab writes "
                                     f"{FIELD_FORMATS.get(key, 'no such field')!r} and decodes nothing else")
    if config.get("encryption"):
        raise UntrustedFileError(f"refusing {where}: its shards are encrypted, which difflab never writes")
    for chunk in index["chunks"]:
        bare_name(chunk.get("filename") if isinstance(chunk, dict) else None, where, "chunks[].filename",
                  pattern=CHUNK_NAME)


class LatentShards(LatentCache):
    """A finished shard directory opened for reading: the manifest, normalisation tensors, split locations.

    Shares ``LatentCache``'s manifest accessors, autoencoder hash check and decoding; the data is read by
    ``difflab.datamodules.streaming_latents``.
    """

    def __init__(self, location: str | Path, storage_options: dict | None = None, check_index: bool = True):
        location = str(location) if is_url(location) else str(Path(location).expanduser())
        self.location, self.storage_options = location, storage_options
        self.dir = location  # for LatentCache's messages
        manifest = check_shard_manifest(_fetch_json(location, MANIFEST, storage_options), location)
        self.manifest = manifest
        t = manifest["transform"]
        self.scale = torch.tensor(t["scale"], dtype=torch.float32)
        self.shift = torch.tensor(t["shift"], dtype=torch.float32)
        self._verified = weakref.WeakSet()
        if check_index:
            for split in self.splits:
                check_split_index(manifest, location, split, storage_options)

    def split_location(self, split: str) -> str:
        self.split_info(split)
        return join(self.location, split)

    @property
    def samples_per_shard(self) -> int:
        return int(shard_info(self.manifest)["samples_per_shard"])

    def layout_identity(self, split: str) -> dict:
        """What a saved reading position depends on: the split's size and shard layout."""
        info = shard_info(self.manifest)
        return {"split": split, "count": self.count(split), "samples_per_shard": info["samples_per_shard"],
                "order_seed": info.get("order_seed")}

    def latents_path(self, split: str):  # pragma: no cover - no single array in a shard directory
        raise ConfigError(f"{self.location} is sharded: read it with datamodule=latents_stream")

    def open_latents(self, split: str):  # pragma: no cover
        raise ConfigError(f"{self.location} is sharded: read it with datamodule=latents_stream")


def open_shards(location: str | Path, storage_options: dict | None = None) -> LatentShards:
    """Open a finished shard directory (local path or object-storage URL), checking manifest and shard indexes."""
    return LatentShards(location, storage_options)


# ---------------------------------------------------------------------------------------------- writing
def write_shard(split_path: Path, shard: int, samples_per_shard: int, z: np.ndarray, index: np.ndarray,
                labels: np.ndarray | None = None, texts: Sequence[str] | None = None, *, key: str = "z",
                moments: bool = True) -> dict:
    """Write one shard (``chunk-<shard>-0.bin`` and its ``<shard>.index.json``) of at most ``samples_per_shard``
    records in the given order; returns the per-channel moments of its latents (``moments=False``: only the count).
    ``key`` names the array of each record (``"z"``: latents; ``"video"``: clips)."""
    require_litdata("writing sharded latents")
    from litdata.streaming.writer import BinaryWriter

    n = len(z)
    if not 0 < n <= samples_per_shard:
        raise ValueError(f"a shard holds 1 to {samples_per_shard} samples, got {n}")
    z = np.ascontiguousarray(z)
    writer = BinaryWriter(str(split_path), chunk_size=int(samples_per_shard),  # the same config for every shard
                          serializers={"str": _text_serializer()})
    writer._rank = int(shard)  # names the shard's files; litdata merges the per-rank indexes in rank order
    try:
        for i in range(n):
            record = {key: z[i], "index": int(index[i])}
            if labels is not None:
                record["label"] = int(labels[i])
            if texts is not None:
                record["text"] = str(texts[i])
            writer[i] = record
        writer.done()
    except OSError as err:  # nothing of this shard is kept; the manifest still records the shards before it
        _drop_unfinished(split_path, int(shard), keep_index=True)
        if is_disk_full(err):
            raise disk_full(split_path / f"chunk-{int(shard)}-0.bin", err) from None
        raise
    return _moments_of(z) if moments else {"n": int(n)}


def _text_serializer():
    """litdata's string serializer for every text: its own refuses a text that names an existing file, and litdata
    then stores the field as a pickle, which the reader refuses."""
    from litdata.streaming.serializers import StringSerializer

    class AnyText(StringSerializer):
        def can_serialize(self, data) -> bool:
            return isinstance(data, str)

    return AnyText()


def _drop_unfinished(split_path: Path, finished: int, keep_index: bool = False) -> None:
    """Remove files of shards >= ``finished`` (left by an interrupted run or a failed write) and a stale merged index
    (unless ``keep_index``)."""
    if not split_path.is_dir():
        return
    if not keep_index:
        (split_path / INDEX).unlink(missing_ok=True)
    for f in split_path.iterdir():
        name = f.name
        shard = None
        if name.startswith("chunk-") and name.endswith(".bin"):
            shard = name.split("-")[1]
        elif name.endswith(f".{INDEX}"):
            shard = name.split(".")[0]
        if shard is not None and shard.isdigit() and int(shard) >= finished:
            f.unlink()


def _merge_index(split_path: Path) -> None:
    """Merge the shards' indexes (``<p>.index.json``, in shard order) into the split's ``index.json``."""
    from litdata.streaming.writer import BinaryWriter

    BinaryWriter(str(split_path), chunk_size=1)._merge_no_wait()


Block = tuple[np.ndarray, "np.ndarray | None", "list[str] | None"]  # latents, labels, texts (in write order)


def write_split(out_dir: Path, manifest: dict, split: str, blocks: Callable[[int], Iterator[Block]], *,
                dtype: str, progress=None, key: str = "z", moments: bool = True) -> None:
    """Write (or finish) one split's shards from ``blocks(start)``: an iterator over consecutive blocks of samples in
    write order from position ``start``. Records progress in the manifest after every shard. ``key`` and
    ``moments``: as in ``write_shard``."""
    info = manifest["splits"][split]
    n, s = int(info["count"]), int(shard_info(manifest)["samples_per_shard"])
    path = split_dir(out_dir, split)
    shards: list = info.setdefault("shards", [])
    if info["done"] >= n and (path / INDEX).is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    if not (path / INDEX).is_file():  # keep the recorded shards whose files are all there (a merge removes them)
        k = 0
        while k < len(shards) and (path / f"chunk-{k}-0.bin").is_file() and (path / f"{k}.{INDEX}").is_file():
            k += 1
        del shards[k:]
    else:
        del shards[:]  # a merged index of an unfinished split: its per-shard indexes are gone, start the split over
    _drop_unfinished(path, len(shards))
    done = info["done"] = min(len(shards) * s, n)  # shards are all full but the last
    order = write_order(n, shard_info(manifest).get("order_seed"))
    task = progress.add_task(split, total=n, completed=done) if progress is not None else None
    zs, labels, texts, have = [], [], [], 0

    def flush(count: int) -> None:
        nonlocal zs, labels, texts, have, done
        z = np.concatenate(zs) if len(zs) > 1 else zs[0]
        lab = (np.concatenate(labels) if len(labels) > 1 else labels[0]) if info["has_label"] else None
        txt = texts if info["has_text"] else None
        stats = write_shard(path, len(shards), s, z[:count], order[done:done + count],
                              None if lab is None else lab[:count], None if txt is None else txt[:count],
                              key=key, moments=moments)
        zs, have = [z[count:]], have - count
        if lab is not None:
            labels = [lab[count:]]
        if txt is not None:
            texts = txt[count:]
        shards.append(stats)
        done += count
        info["done"] = done
        write_manifest(out_dir, manifest)  # after the shard's files: a crash redoes at most this shard
        if task is not None:
            progress.update(task, completed=done)

    if done < n:
        for z, lab, txt in blocks(done):
            zs.append(np.asarray(z, dtype=dtype))
            have += len(z)
            if info["has_label"]:
                labels.append(np.asarray(lab, dtype=np.int64))
            if info["has_text"]:
                texts.extend(txt)
            while have >= s:
                flush(s)
        if have:
            flush(have)
    if done != n:
        raise ConfigError(f"split {split!r} gave {done} samples, its manifest records {n}: the source changed "
                          f"while writing; rerun with overwrite=true")
    _merge_index(path)
    merged = json.loads((path / INDEX).read_text())
    if sum(int(c["chunk_size"]) for c in merged["chunks"]) != n:
        raise CorruptDataError(f"{path / INDEX} does not list the {n} samples written: rerun with overwrite=true")


def shard_manifest(base: dict, *, samples_per_shard: int, order_seed: int | None, shard_format: str = SHARD_FORMAT,
                   shard_version: int = SHARD_VERSION) -> dict:
    """``base`` (a cache manifest or a fresh one) turned into a shard manifest (``shard_format`` / ``shard_version``:
    the record layout's name and version, the latent shards' by default)."""
    litdata = require_litdata("writing shards")
    m = copy.deepcopy(base)
    m["layout"] = LAYOUT
    m["shards"] = {"format": shard_format, "version": int(shard_version), "library": "litdata",
                   "library_version": getattr(litdata, "__version__", "?"), "samples_per_shard": int(samples_per_shard),
                   "order_seed": None if order_seed is None else int(order_seed)}
    return m


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> dict | None:
    """The existing manifest of ``out_dir`` to resume (None: start fresh); clears it with ``overwrite``."""
    old = read_manifest(out_dir) if out_dir.exists() else None
    if old is not None and overwrite:
        clear_cache(out_dir, old)
        return None
    if old is None and out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} exists, is not empty and holds no {MANIFEST}: choose a new or empty out_dir "
                          f"for the shards")
    if old is not None and old.get("layout") != LAYOUT:
        raise ConfigError(f"{out_dir} holds a memory-mapped latent cache: write the shards to another out_dir (or "
                          f"overwrite=true)")
    return old


def _check_layout(out_dir: Path, old: dict, samples_per_shard: int | None, order_seed: int | None) -> None:
    info = shard_info(old)
    hint = "use a new out_dir or overwrite=true"
    if info.get("version") != SHARD_VERSION or old.get("version") != VERSION:
        raise ConfigError(f"{out_dir} holds shards of another format version: {hint}")
    if samples_per_shard is not None and int(samples_per_shard) != info["samples_per_shard"]:
        raise ConfigError(f"{out_dir} was written with {info['samples_per_shard']} samples per shard, this run asks "
                          f"for {samples_per_shard}: {hint}")
    if order_seed != info.get("order_seed"):
        raise ConfigError(f"{out_dir} was written with shard_seed={info.get('order_seed')}, this run uses "
                          f"{order_seed}: {hint}")


def _finish(out_dir: Path, manifest: dict, target_std: float, per_channel: bool) -> dict:
    mean, var, _ = combine_moments(manifest["splits"]["train"]["shards"])
    manifest["transform"] = normalisation(mean, var, target_std, per_channel)
    manifest["status"] = STATUS_COMPLETE
    manifest["completed"] = now()
    write_manifest(out_dir, manifest)
    return manifest


def cache_to_shards(cache_dir: str | Path, out_dir: str | Path, *, samples_per_shard: int | None = None,
                    order_seed: int | None = 0, overwrite: bool = False, progress: bool = False) -> dict:
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
        manifest = shard_manifest(cache.manifest, samples_per_shard=s, order_seed=order_seed)
        manifest.update(status=STATUS_IN_PROGRESS, created=now(), source_cache=str(cache.dir))
        for info in manifest["splits"].values():
            info.update(done=0, shards=[])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(out_dir, manifest)
    s = int(shard_info(manifest)["samples_per_shard"])
    from difflab.latents.encode import _progress

    with _progress(progress) as bar:
        for split in cache.splits:
            lat, lab_path, texts = cache.open_latents(split), cache.labels_path(split), cache.texts(split)
            labels = np.load(lab_path, mmap_mode="r") if lab_path is not None else None
            order = write_order(cache.count(split), shard_info(manifest).get("order_seed"))

            def blocks(start: int, lat=lat, labels=labels, texts=texts, order=order):
                for i in range(start, len(order), s):
                    idx = order[i:i + s]
                    rows = np.sort(idx)  # read the rows in file order, then put them in write order
                    pos = np.searchsorted(rows, idx)
                    z = np.asarray(lat[rows])[pos]
                    yield (z, None if labels is None else np.asarray(labels[rows])[pos],
                           None if texts is None else [texts[j] for j in idx.tolist()])

            write_split(out_dir, manifest, split, blocks, dtype=manifest["latent_dtype"], progress=bar)
    manifest["status"] = STATUS_COMPLETE
    manifest["completed"] = now()
    write_manifest(out_dir, manifest)  # the cache's own normalisation, unchanged
    return manifest


def encode_dataset_shards(autoencoder, datamodule, out_dir: str | Path, *, identity: dict | None = None,
                          dataset: dict | None = None, splits: Sequence[str] = ("train", "val"), batch_size: int = 256,
                          dtype: str = "float16", target_std: float = 0.5, per_channel: bool = True,
                          overwrite: bool = False, num_workers: int = 0, device: str | torch.device | None = None,
                          progress: bool = True, samples_per_shard: int | None = None,
                          order_seed: int | None = 0) -> dict:
    """``encode_dataset`` writing shards instead of memory maps (see the module docstring); returns the manifest.

    Same arguments and rules as ``difflab.latents.encode.encode_dataset`` (identity, dataset description, resume,
    refusal to mix autoencoders or datasets), plus ``samples_per_shard`` (None: about 64 MB of latents per shard) and
    ``order_seed`` (the seed of the write-order permutation; None keeps the source order).
    """
    from torch.utils.data import DataLoader, Subset
    from torch.utils.data._utils.collate import default_collate

    from difflab.autoencoders.loading import known_identity, to_plain
    from difflab.latents.encode import (DTYPES, _check_compatible, _encode, _progress, describe_datamodule,
                                        ready_to_encode, same_normalisation)

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
        _check_compatible(out_dir, old, identity, dataset, dtype)
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
        manifest["latent_shape"] = list(_encode(autoencoder, first["x"], device).shape[1:])
        for key in ("num_classes", "class_names", "prompts"):
            manifest[key] = to_plain(getattr(datamodule, key, None))
        s = samples_per_shard or auto_samples_per_shard(manifest["latent_shape"], dtype)
        manifest = shard_manifest(manifest, samples_per_shard=s, order_seed=order_seed)
    for s_name, ds in datasets.items():
        n = len(ds)
        if s_name in manifest["splits"]:
            if manifest["splits"][s_name]["count"] != n:
                raise ConfigError(f"shards {out_dir} split {s_name!r} have {manifest['splits'][s_name]['count']} "
                                  f"samples, the dataset now has {n}: use a new out_dir or overwrite=true")
            continue
        item = ds[0]
        manifest["splits"][s_name] = {"count": n, "done": 0, "has_label": "label" in item, "has_text": "text" in item,
                                      "shards": []}
        manifest["count"][s_name] = n
    manifest["status"] = STATUS_IN_PROGRESS
    write_manifest(out_dir, manifest)

    with _progress(progress) as bar:
        for s_name in splits:
            ds, info = datasets[s_name], manifest["splits"][s_name]
            order = write_order(info["count"], shard_info(manifest).get("order_seed"))

            def blocks(start: int, ds=ds, order=order):
                loader = DataLoader(Subset(ds, order[start:].tolist()), batch_size=batch_size, shuffle=False,
                                    num_workers=num_workers, collate_fn=default_collate)
                for batch in loader:
                    z = _encode(autoencoder, batch["x"], device)
                    yield z, batch.get("label"), batch.get("text")

            write_split(out_dir, manifest, s_name, blocks, dtype=dtype, progress=bar)
    return _finish(out_dir, manifest, target_std, per_channel)
