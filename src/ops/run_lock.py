"""One training run per run directory: an ``fcntl.flock`` on ``<run>/.difflab.lock`` held for the whole run.

Two runs started on the same directory (``hydra.run.dir=X`` twice, ``resume=auto`` twice, a job requeued while the
old one still runs) would overwrite each other's ``last.ckpt`` and delete each other's temporary files. The process
that writes checkpoints (global rank 0) takes an exclusive, non-blocking lock on ``<run>/.difflab.lock`` before it
writes anything of its own and keeps it until ``difflab.pipeline.train`` returns; a second run is refused in one
line naming the directory and the holder (pid, host, start time). The kernel drops the lock when the holding process
dies, however it dies (kill -9, OOM, SLURM requeue), so a stale lock never blocks a resume; the file itself stays.

DDP: Lightning's launcher re-runs ``sys.argv`` in its children with the same run directory and ``LOCAL_RANK`` /
``NODE_RANK`` set (torchrun and SLURM set ``RANK`` / ``SLURM_PROCID``); only the process whose rank variables are
all 0 (or unset) takes the lock, so the children of a locked run are not refused. Filesystems without ``flock``
(some Lustre mounts) get a warning and run unlocked. A single run is also checked before Hydra writes ``.hydra/``
into the directory (``ensure_run_dir_free``, from the start-time config check), so a refused run writes nothing; a
sweep job is checked as it starts, after Hydra has written its ``.hydra/``, which the pre-flight then puts back.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Mapping

from difflab.utils.errors import DifflabError, disk_full, is_disk_full

log = logging.getLogger(__name__)

LOCK_NAME = ".difflab.lock"
# set by the launchers (Lightning's DDP launcher, torchrun, SLURM, LSF, MPI) in every process but global rank 0's
RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "SLURM_PROCID",
    "JSM_NAMESPACE_RANK",
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
)
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}  # the filesystem cannot lock


class RunDirInUseError(DifflabError):
    """Another live process holds the run directory's lock."""


def is_global_zero_process(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is global rank 0 of its run, judged from the launchers' rank variables before the
    Trainer exists: every one that is set must be 0 (a DDP child has LOCAL_RANK, NODE_RANK or RANK > 0)."""
    env = os.environ if env is None else env
    for name in RANK_VARIABLES:
        value = env.get(name, "").strip()
        if value and value != "0":
            return False
    return True


def lock_holder(path: str | Path) -> str:
    """What the holder wrote into the lock file (``pid 123 on host h since ...``), or ``an unknown process``."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "an unknown process"


def _holder_line() -> str:
    return f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _open_lock_file(path: Path) -> int | None:
    """The lock file's descriptor (created if needed); None (with a warning) where it cannot be created."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(path, err) from err
        log.warning(
            "cannot create the run lock %s (%s): this run is not protected against a second run of the same directory",
            path,
            err.strerror or err,
        )
        return None


def acquire_run_lock(run_dir: str | Path) -> int | None:
    """Take ``<run_dir>/.difflab.lock`` (exclusive, non-blocking) and write this process's pid and host into it;
    returns the descriptor that holds it (None where the filesystem cannot lock). A held lock raises
    ``RunDirInUseError`` naming the directory and the holder, before this run writes anything."""
    import fcntl

    path = Path(run_dir) / LOCK_NAME
    fd = _open_lock_file(path)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _in_use(run_dir, path) from None
        if err.errno in _NO_LOCKS:
            log.warning(
                "the filesystem of %s cannot lock files (%s): this run is not protected against a second run "
                "of the same directory",
                run_dir,
                err.strerror,
            )
            return None
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder_line() + "\n").encode(), 0)
    except OSError as err:
        release_run_lock(fd)
        if is_disk_full(err):
            raise disk_full(path, err) from err
        raise
    return fd


def ensure_run_dir_free(run_dir: str | Path) -> None:
    """Raise ``RunDirInUseError`` when a live run holds ``<run_dir>``'s lock; takes nothing. The start-time check
    (``difflab.preflight.ValidateConfig``) calls it before Hydra writes a single run's ``.hydra/`` into the directory
    and as a sweep job starts."""
    import fcntl

    path = Path(run_dir) / LOCK_NAME
    if not is_global_zero_process() or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _in_use(run_dir, path) from None
    finally:
        os.close(fd)


def _in_use(run_dir: str | Path, path: Path) -> RunDirInUseError:
    return RunDirInUseError(
        f"run directory {Path(run_dir)} is in use by another training run ({lock_holder(path)}); "
        f"wait for it to end (resume then with resume=auto) or give this run another directory "
        f"(hydra.run.dir=...)"
    )


def release_run_lock(fd: int | None) -> None:
    """Clear the holder line and drop the lock (the kernel also drops it when the process dies)."""
    if fd is None:
        return
    import fcntl

    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[Path | None]:
    """Hold ``<run_dir>/.difflab.lock`` for the ``with`` block in global rank 0 (yields its path); other ranks of
    the same run (DDP children) hold nothing and yield None."""
    if not is_global_zero_process():
        yield None
        return
    fd = acquire_run_lock(run_dir)
    try:
        yield Path(run_dir) / LOCK_NAME if fd is not None else None
    finally:
        release_run_lock(fd)
