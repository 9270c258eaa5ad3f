"""Datasets as litdata shards (latents, clips): the record formats difflab writes and reads, writing a split shard
by shard with its progress in the manifest (resumable at shard boundaries), and checking a split's index before
litdata reads it.

Each split directory holds ``index.json`` (litdata's index) and ``chunk-<p>-0.bin``: shard p, write positions
[p*S, (p+1)*S) of the split, S samples per shard. The write order is a seeded permutation of the source split, so
every shard is a uniform random subset even when the source is sorted by class.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from difflab.storage.location import fetch_json, join, require_litdata
from difflab.storage.manifest import MANIFEST, STATUS_COMPLETE, split_dir, write_manifest
from difflab.trust import bare_name
from difflab.utils.errors import ConfigError, CorruptDataError, UntrustedFileError, disk_full, is_disk_full

LAYOUT = "shards"  # a manifest's "layout" for shard directories (caches: "mmap")
INDEX = "index.json"  # litdata's index of a split's shards
SHARD_BYTES = 64 * 2**20  # default shard size: litdata's recommended ~64 MB chunks
# What each record field is stored as (litdata's data_format names). The reader refuses any other format before
# litdata decodes a byte: litdata picks each field's decoder from the index, and "pickle" would run code.
FIELD_FORMATS = {"z": "numpy", "video": "numpy", "index": "int", "label": "int", "text": "str"}
CHUNK_NAME = r"chunk-[0-9]+-[0-9]+\.bin"  # litdata's names for difflab's shards (no compression)
Stats = Callable[[np.ndarray], dict]  # what a shard records about its arrays (at least {"n": count})


def shard_info(manifest: dict) -> dict:
    """The manifest's ``shards`` block (format, version, samples per shard, write-order seed)."""
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


def expected_keys(info: dict) -> list[str]:
    """The record keys a split's manifest entry promises."""
    if info.get("record_keys"):  # other record layouts (difflab.datamodules.streaming_clips) list their keys
        return list(info["record_keys"])
    return ["z", "index"] + (["label"] if info.get("has_label") else []) + (["text"] if info.get("has_text") else [])


def index_keys(index: dict) -> list[str] | None:
    """The record keys a litdata index declares (None when this litdata version writes them elsewhere)."""
    try:
        spec = json.loads(index["config"]["data_spec"])
        return json.loads(spec[1]["context"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def check_shards_complete(
    manifest: dict, location: str, shard_format: str, shard_version: int, rewrite: str, what: str, rerun: str
) -> None:
    """The manifest's shard block is ``shard_format`` / ``shard_version`` and every split is written; else one line
    (another format version: rewrite; an interrupted writer: rerun it)."""
    info = shard_info(manifest)
    if info.get("format") != shard_format or info.get("version") != shard_version:
        raise CorruptDataError(
            f"{location} holds shards of format {info.get('format')!r} version "
            f"{info.get('version')}, this difflab reads {shard_format!r} version {shard_version}: "
            f"{rewrite}"
        )
    if manifest.get("status") != STATUS_COMPLETE:
        done = {s: f"{v.get('done', 0)}/{v.get('count', '?')}" for s, v in manifest.get("splits", {}).items()}
        raise ConfigError(f"{what} {location} is incomplete ({done}): rerun {rerun} to finish it")


def check_split_index(
    manifest: dict,
    location: str,
    split: str,
    storage_options: dict | None = None,
    *,
    writer: str = "encode_latents.py format=shards",
) -> dict:
    """litdata's index of one split, checked against the manifest (count of samples, record keys); ``writer`` is
    the command named in the messages."""
    info = manifest["splits"][split]
    where = join(location, split, INDEX)
    index = fetch_json(join(location, split), INDEX, storage_options)
    if index is None:
        raise CorruptDataError(
            f"{where} is missing: the shard directory is damaged, rewrite it with {writer} overwrite=true"
        )
    try:
        count = sum(int(c["chunk_size"]) for c in index["chunks"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptDataError(f"{where} is not a litdata shard index ({e}); rewrite the shards") from e
    if count != int(info["count"]):
        raise CorruptDataError(
            f"{where} lists {count} samples but {join(location, MANIFEST)} records "
            f"{info['count']} for split {split!r}: the manifest belongs to other shards; rewrite "
            f"them with {writer} overwrite=true"
        )
    keys = index_keys(index)
    if keys is not None and keys != expected_keys(info):
        raise CorruptDataError(
            f"{where} stores records {keys}, the manifest expects {expected_keys(info)}: rewrite "
            f"the shards with {writer} overwrite=true"
        )
    check_index_safe(index, keys or expected_keys(info), where)
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
            raise UntrustedFileError(
                f"refusing {where}: field {key!r} is stored as {fmt!r}; difflab writes "
                f"{FIELD_FORMATS.get(key, 'no such field')!r} and decodes nothing else"
            )
    if config.get("encryption"):
        raise UntrustedFileError(f"refusing {where}: its shards are encrypted, which difflab never writes")
    for chunk in index["chunks"]:
        bare_name(
            chunk.get("filename") if isinstance(chunk, dict) else None, where, "chunks[].filename", pattern=CHUNK_NAME
        )


def write_shard(
    split_path: Path,
    shard: int,
    samples_per_shard: int,
    z: np.ndarray,
    index: np.ndarray,
    labels: np.ndarray | None = None,
    texts: Sequence[str] | None = None,
    *,
    key: str = "z",
    stats: Stats | None = None,
) -> dict:
    """Write one shard (``chunk-<shard>-0.bin`` and its ``<shard>.index.json``) of at most ``samples_per_shard``
    records in the given order; returns ``stats(arrays)`` (e.g. the latents' per-channel moments) or the count.
    ``key`` names the array of each record (``"z"``: latents; ``"video"``: clips)."""
    require_litdata("writing shards")
    from litdata.streaming.writer import BinaryWriter

    n = len(z)
    if not 0 < n <= samples_per_shard:
        raise ValueError(f"a shard holds 1 to {samples_per_shard} samples, got {n}")
    z = np.ascontiguousarray(z)
    writer = BinaryWriter(
        str(split_path),
        chunk_size=int(samples_per_shard),  # the same config for every shard
        serializers={"str": text_serializer()},
    )
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
        drop_unfinished(split_path, int(shard), keep_index=True)
        if is_disk_full(err):
            raise disk_full(split_path / f"chunk-{int(shard)}-0.bin", err) from None
        raise
    return stats(z) if stats is not None else {"n": int(n)}


def text_serializer():
    """litdata's string serializer for every text: its own refuses a text that names an existing file, and litdata
    then stores the field as a pickle, which the reader refuses."""
    from litdata.streaming.serializers import StringSerializer

    class AnyText(StringSerializer):
        def can_serialize(self, data) -> bool:
            return isinstance(data, str)

    return AnyText()


def drop_unfinished(split_path: Path, finished: int, keep_index: bool = False) -> None:
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


def merge_index(split_path: Path) -> None:
    """Merge the shards' indexes (``<p>.index.json``, in shard order) into the split's ``index.json``."""
    from litdata.streaming.writer import BinaryWriter

    BinaryWriter(str(split_path), chunk_size=1)._merge_no_wait()


Block = tuple[np.ndarray, "np.ndarray | None", "list[str] | None"]  # latents, labels, texts (in write order)


def write_split(
    out_dir: Path,
    manifest: dict,
    split: str,
    blocks: Callable[[int], Iterator[Block]],
    *,
    dtype: str,
    progress=None,
    key: str = "z",
    stats: Stats | None = None,
) -> None:
    """Write (or finish) one split's shards from ``blocks(start)``: an iterator over consecutive blocks of samples in
    write order from position ``start``. Records progress in the manifest after every shard. ``key`` and
    ``stats``: as in ``write_shard``."""
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
    drop_unfinished(path, len(shards))
    done = info["done"] = min(len(shards) * s, n)  # shards are all full but the last
    order = write_order(n, shard_info(manifest).get("order_seed"))
    task = progress.add_task(split, total=n, completed=done) if progress is not None else None
    zs, labels, texts, have = [], [], [], 0

    def flush(count: int) -> None:
        nonlocal zs, labels, texts, have, done
        z = np.concatenate(zs) if len(zs) > 1 else zs[0]
        lab = (np.concatenate(labels) if len(labels) > 1 else labels[0]) if info["has_label"] else None
        txt = texts if info["has_text"] else None
        written = write_shard(
            path,
            len(shards),
            s,
            z[:count],
            order[done : done + count],
            None if lab is None else lab[:count],
            None if txt is None else txt[:count],
            key=key,
            stats=stats,
        )
        zs, have = [z[count:]], have - count
        if lab is not None:
            labels = [lab[count:]]
        if txt is not None:
            texts = txt[count:]
        shards.append(written)
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
        raise ConfigError(
            f"split {split!r} gave {done} samples, its manifest records {n}: the source changed "
            f"while writing; rerun with overwrite=true"
        )
    merge_index(path)
    merged = json.loads((path / INDEX).read_text())
    if sum(int(c["chunk_size"]) for c in merged["chunks"]) != n:
        raise CorruptDataError(f"{path / INDEX} does not list the {n} samples written: rerun with overwrite=true")


def shard_manifest(
    base: dict, *, samples_per_shard: int, order_seed: int | None, shard_format: str, shard_version: int
) -> dict:
    """``base`` (a cache manifest or a fresh one) turned into a shard manifest (``shard_format`` / ``shard_version``:
    the record layout's name and version)."""
    litdata = require_litdata("writing shards")
    m = copy.deepcopy(base)
    m["layout"] = LAYOUT
    m["shards"] = {
        "format": shard_format,
        "version": int(shard_version),
        "library": "litdata",
        "library_version": getattr(litdata, "__version__", "?"),
        "samples_per_shard": int(samples_per_shard),
        "order_seed": None if order_seed is None else int(order_seed),
    }
    return m
