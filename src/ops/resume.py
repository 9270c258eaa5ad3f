"""Which checkpoint a run resumes from: ``ckpt_path`` (a path or ``last``) and ``resume`` (``auto``).

- ``ckpt_path=last``: ``<run>/checkpoints/last.ckpt`` of this run directory; ``ckpt_path=PATH``: that file.
- ``resume=auto``: the newest checkpoint of this run directory if there is one, else start fresh. A new run gets a
  new timestamped directory, so give the directory to continue: ``hydra.run.dir=logs/train/runs/<that run>``.
- ``resume=null`` (default): like ``auto`` when SLURM requeued the job (``SLURM_RESTART_COUNT`` > 0), else fresh.
- ``resume=never``: always start fresh.
A checkpoint must be readable before Lightning starts (``check_readable``: ``difflab.checkpoints.load_checkpoint``
on the meta device, which reads the file's structure but no tensor data). ``resume=auto`` skips unreadable ones (a
``last.ckpt`` truncated by a job killed while copying it) with a warning naming each and takes the newest readable
one, or starts fresh with a warning when none is; an explicit ``ckpt_path`` that is unreadable is refused in one line.
Either way Lightning restores weights, EMA, optimizer, LR schedule, loop counters, (``RNGState``) RNG states and the
data loaders' position within the epoch, worker RNG included (``difflab.datamodules.loaders``).
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

from difflab.checkpoints import load_checkpoint
from difflab.ops.atomic import TMP_SUFFIX
from difflab.ops.fsdp import sharded_checkpoint_dir
from difflab.utils.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

RESUME_CHOICES = ("auto", "never", None)


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """Every finished checkpoint of a run directory (``checkpoints/*.ckpt`` and Lightning's ``hpc_ckpt_*.ckpt``)."""
    run_dir = Path(run_dir)
    found = list((run_dir / "checkpoints").glob("*.ckpt")) + list(run_dir.glob("hpc_ckpt_*.ckpt"))
    return [p for p in found if p.is_file() and not p.name.startswith(".") and not p.name.endswith(TMP_SUFFIX)]


def newest_first(paths: list[Path]) -> list[Path]:
    """Checkpoints ordered from the most recently written (by modification time; ``last*.ckpt`` wins ties)."""
    return sorted(paths, key=lambda p: (p.stat().st_mtime_ns, p.name.startswith("last")), reverse=True)


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recently written checkpoint of ``run_dir`` (by modification time; ``last*.ckpt`` wins ties)."""
    cands = newest_first(checkpoint_candidates(run_dir))
    return cands[0] if cands else None


def check_readable(path: str | Path) -> None:
    """Raise the one-line ``CheckpointError`` of ``difflab.checkpoints.load_checkpoint`` when ``path`` cannot be
    read (truncated, corrupt, not a checkpoint, unsafe). Loaded on the meta device: the zip directory and the pickled
    structure are read, no tensor data. A sharded checkpoint (``trainer=fsdp``) is readable when its committed file
    points to a complete shard directory; the shards themselves are not read."""
    path = Path(path)
    shards_beside = any(path.parent.glob(f"{glob.escape(path.name)}.shards-*"))
    if (shards_beside or path.is_dir()) and sharded_checkpoint_dir(path) is not None:
        return
    load_checkpoint(path, map_location="meta")


def find_latest_readable_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that ``check_readable`` accepts; each unreadable newer one is skipped
    with a warning naming it (a truncated ``last.ckpt`` falls back to the newest periodic checkpoint)."""
    cands = newest_first(checkpoint_candidates(run_dir))
    for path in cands:
        try:
            check_readable(path)
        except CheckpointError as err:
            log.warning("resume: skipping unreadable checkpoint %s (%s)", path, err)
            continue
        return path
    if cands:
        log.warning("resume: none of the %d checkpoints in %s is readable: starting fresh", len(cands), run_dir)
    return None


def slurm_requeued() -> bool:
    """True when SLURM restarted this job (requeue after pre-emption or time limit)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def resolve_resume(ckpt_path: str | None, resume: str | None, output_dir: str | Path) -> str | None:
    """The checkpoint to pass to ``Trainer.fit(ckpt_path=...)``, or None to start fresh."""
    if resume not in RESUME_CHOICES:
        raise ConfigError(f"resume={resume!r} is not one of auto, never, null")
    if ckpt_path not in (None, ""):
        path = Path(output_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
        if not path.is_file():
            hint = (
                " (ckpt_path=last needs the run directory: add hydra.run.dir=<that run>)" if ckpt_path == "last" else ""
            )
            raise CheckpointError(f"ckpt_path={ckpt_path}: no checkpoint at {path}{hint}")
        try:
            check_readable(path)
        except CheckpointError as err:
            raise CheckpointError(
                f"ckpt_path={ckpt_path}: {err}; resume from another checkpoint, or with resume=auto "
                f"(the newest readable one of the run directory)"
            ) from None
        return str(path)
    if resume == "auto" or (resume is None and slurm_requeued()):
        latest = find_latest_readable_checkpoint(output_dir)
        if latest is None:
            log.info("resume: no readable checkpoint in %s, starting fresh", output_dir)
            return None
        log.info("resume: continuing from %s", latest)
        return str(latest)
    return None
