"""The latent cache's manifest: its format name and version, file names, and reading and checking it."""

from __future__ import annotations

import json
from pathlib import Path

from difflab.storage.manifest import MANIFEST, STATUS_IN_PROGRESS, check_manifest_data, now
from difflab.utils.errors import CorruptDataError

FORMAT = "difflab-latent-cache"
VERSION = 1
LATENTS, LABELS, TEXTS, TEXTS_PARTIAL = "latents.npy", "labels.npy", "texts.json", "texts.partial.jsonl"


def read_manifest(cache_dir: str | Path) -> dict | None:
    """The manifest of a cache directory, or None when there is none."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptDataError(
            f"latent cache manifest {path} is unreadable ({e}); delete the directory or rerun "
            f"encode_latents.py with overwrite=true"
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptDataError(f"{path} is not a difflab latent cache manifest (format != {FORMAT!r})")
    return check_manifest_data(manifest, path)


def new_manifest(identity: dict, dataset: dict, dtype: str, chunk_size: int) -> dict:
    """A fresh in-progress manifest; ``latent_shape``, ``pixel_shape``, splits and ``transform`` are filled later."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "status": STATUS_IN_PROGRESS,
        "created": now(),
        "autoencoder": identity,
        "dataset": dataset,
        "latent_dtype": dtype,
        "chunk_size": int(chunk_size),
        "splits": {},
        "count": {},
        "transform": None,
    }
