"""Crash-safe file writes: write a temporary file next to the target, fsync it, then rename it over the target.

``os.replace`` within one directory is atomic on POSIX filesystems, so readers (and a resumed run) see either the
complete old file or the complete new one, never a truncated mix, even if the writer is SIGKILLed mid-write.
The temporary file gets the permissions a plain ``open(path, "w")`` would give (``0o666 & ~umask``): ``mkstemp``
creates it 0600 and ``os.replace`` keeps that mode, which would hide checkpoints, figures and exports from the rest of
a group on a shared cluster. A write that fills the disk (or the quota) raises ``difflab.utils.errors.DiskFullError``:
one line naming the target, whose previous version is intact, and no temporary file is left. This module imports only
torch and ``difflab.utils.errors``, so a small helper process can use it without importing Lightning.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from difflab.utils.errors import DiskFullError, disk_full, is_disk_full

TMP_SUFFIX = ".tmp"
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where possible.

    Linux reports it in ``/proc/self/status`` (``Umask:``, kernels >= 4.7). Elsewhere the only way is to set it and
    put it back: that swap runs under a lock (concurrent callers of this function never read the stand-in) and the
    stand-in is 022, so a file another thread creates in that instant is at worst 0644, never world-writable.
    The umask is read on every call (not cached) because a process may change it after importing this module.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` minus the umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


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


def _temporary_beside(path: Path) -> Path:
    """A new empty temporary file in ``path``'s directory (created with it); a full disk is a ``DiskFullError``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(path, err) from err
        raise
    os.close(fd)
    return Path(tmp_name)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success fsync it and rename it over ``path``.

    On any error (or a kill) the target is untouched; the temporary file is removed unless the process died.
    Leftover temporaries are hidden files named ``.<name>.<random>.tmp`` and never match ``*.ckpt``. The result has
    mode ``0o666 & ~umask`` (see ``default_file_mode``), like any file the process creates with ``open``.
    A full disk or quota (while writing, fsyncing or renaming) raises ``DiskFullError`` naming ``path``: one line,
    the previous ``path`` intact, the temporary file removed.
    """
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        # after the write: some writers (safetensors) replace the file and recreate it 0600 themselves
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(err, DiskFullError) and is_disk_full(err):
            raise disk_full(path, err) from err
        raise


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp_path)`` and atomically move the result to ``path``; returns ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file object: a failed write then raises the OSError with its errno (ENOSPC),
    where torch's own file writer only says ``unexpected pos``."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` that never leaves a partially written ``path`` behind."""
    return atomic_write(path, lambda tmp: _torch_save(obj, tmp))


def write_text(path: str | Path, text: str) -> Path:
    """``Path.write_text`` (UTF-8) through ``atomic_write``: readers never see half a file, and a symbolic link
    planted at ``path`` is replaced, not followed."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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
