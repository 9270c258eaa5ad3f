"""The measurement protocol of a sample metric, recorded next to its value.

A Frechet distance is only comparable with another one measured the same way: the same number of generated
samples, the same feature network and weights, the same reference set and the same resizing. Most "my FID does not
match the paper" reports come down to one of these. Every run that computes sample metrics therefore writes
``<run>/metrics/protocol.json``: for each Frechet metric, those facts plus the real-vs-real value at the same sample
count (the floor: what a perfect generator would score with that many samples). ``ablate.py`` prints it and warns
when the arms of a sweep were not measured alike. The protocol per dataset is in ``docs/METRICS.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from difflab.ops.atomic import atomic_write

PROTOCOL_FILE = Path("metrics") / "protocol.json"
# Weight files looked for inside a weights directory (Hugging Face layout), in order.
WEIGHT_FILES_IN_DIR = ("model.safetensors", "pytorch_model.bin")

_DIGESTS: dict[tuple[str, int, int], str] = {}


def weights_digest(path: str | os.PathLike | None, length: int = 12) -> str | None:
    """The first ``length`` hex digits of the SHA-256 of a weights file (or of the weights file inside a Hugging
    Face model directory); None when there is no such file. Cached per path, size and modification time."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        p = next((p / name for name in WEIGHT_FILES_IN_DIR if (p / name).is_file()), p)
    if not p.is_file():
        return None
    stat = p.stat()
    key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key][:length]


def describe_feature(feature: Any) -> dict[str, Any]:
    """What the protocol says about a feature network: its weights file, their digest and its input resizing.

    Feature modules state ``weights_path`` and ``resize``; a custom module without them is recorded as unknown."""
    path = getattr(feature, "weights_path", None)
    return {
        "weights": None if path is None else str(path),
        "weights_sha256": weights_digest(path),
        "resize": getattr(feature, "resize", "unknown (the feature module does not say)"),
    }


def write_protocol(run_dir: str | os.PathLike, entries: dict[str, dict[str, Any]]) -> Path:
    """Merge ``entries`` (metric name -> protocol) into ``<run>/metrics/protocol.json``, atomically."""
    path = Path(run_dir) / PROTOCOL_FILE
    current: dict[str, Any] = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            current = {}
    current.update(entries)
    text = json.dumps(current, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_protocol(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The protocol entries a run recorded ({} when it recorded none)."""
    path = Path(run_dir) / PROTOCOL_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def protocol_line(name: str, entry: dict[str, Any]) -> str:
    """One human-readable line: how ``name`` was measured."""
    ref = entry.get("reference") or {}
    floor = entry.get("floor")
    parts = [
        f"{name}: {entry.get('n_samples')} samples",
        f"features {entry.get('feature')}",
        f"weights sha256 {entry.get('weights_sha256') or 'n/a'}",
        f"resize: {entry.get('resize')}",
        f"reference {ref.get('dataset')} {ref.get('split')} n={ref.get('n')}",
        "real-vs-real floor " + ("n/a" if floor is None else f"{float(floor):.4g}"),
        f"eval seed {entry.get('eval_seed')}",
    ]
    return "; ".join(parts)
