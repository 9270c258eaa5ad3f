"""The manifest every written dataset directory carries (latent caches, latent shards, clip shards): its name,
progress states, split directories, and atomic replacement."""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Any

from difflab.ops.atomic import atomic_write
from difflab.trust import data_strings, split_name
from difflab.utils.errors import UntrustedFileError

MANIFEST = "manifest.json"
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
