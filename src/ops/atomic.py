"""Crash-safe file writes: write a temporary file next to the target, fsync it, then rename it over the target.

``os.replace`` within one directory is atomic on POSIX filesystems, so readers (and a resumed run) see either the
complete old file or the complete new one, never a truncated mix, even if the writer is SIGKILLed mid-write.
This module imports only torch, so a small helper process can use it without importing Lightning.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

TMP_SUFFIX = ".tmp"


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (the directory entry); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success fsync it and rename it over ``path``.

    On any error (or a kill) the target is untouched; the temporary file is removed unless the process died.
    Leftover temporaries are hidden files named ``.<name>.<random>.tmp`` and never match ``*.ckpt``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp_path)`` and atomically move the result to ``path``; returns ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` that never leaves a partially written ``path`` behind."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporaries left by writers that were killed mid-write (``.*.tmp`` files); returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed
