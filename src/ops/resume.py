"""Which checkpoint a run resumes from: ``ckpt_path`` (a path or ``last``) and ``resume`` (``auto``).

- ``ckpt_path=last``: ``<run>/checkpoints/last.ckpt`` of this run directory; ``ckpt_path=PATH``: that file.
- ``resume=auto``: the newest checkpoint of this run directory if there is one, else start fresh. A new run gets a
  new timestamped directory, so give the directory to continue: ``hydra.run.dir=logs/train/runs/<that run>``.
- ``resume=null`` (default): like ``auto`` when SLURM requeued the job (``SLURM_RESTART_COUNT`` > 0), else fresh.
- ``resume=never``: always start fresh.
Either way Lightning restores weights, EMA, optimizer, LR schedule, loop counters, (``RNGState``) RNG states and the
data loaders' position within the epoch, worker RNG included (``difflab.datamodules.loaders``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from difflab.ops.atomic import TMP_SUFFIX
from difflab.utils.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

RESUME_CHOICES = ("auto", "never", None)


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """Every finished checkpoint of a run directory (``checkpoints/*.ckpt`` and Lightning's ``hpc_ckpt_*.ckpt``)."""
    run_dir = Path(run_dir)
    found = list((run_dir / "checkpoints").glob("*.ckpt")) + list(run_dir.glob("hpc_ckpt_*.ckpt"))
    return [p for p in found if p.is_file() and not p.name.startswith(".") and not p.name.endswith(TMP_SUFFIX)]


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recently written checkpoint of ``run_dir`` (by modification time; ``last*.ckpt`` wins ties)."""
    cands = checkpoint_candidates(run_dir)
    if not cands:
        return None
    return max(cands, key=lambda p: (p.stat().st_mtime_ns, p.name.startswith("last")))


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
            hint = " (ckpt_path=last needs the run directory: add hydra.run.dir=<that run>)" if ckpt_path == "last" else ""
            raise CheckpointError(f"ckpt_path={ckpt_path}: no checkpoint at {path}{hint}")
        return str(path)
    if resume == "auto" or (resume is None and slurm_requeued()):
        latest = find_latest_checkpoint(output_dir)
        if latest is None:
            log.info("resume: no checkpoint in %s, starting fresh", output_dir)
            return None
        log.info("resume: continuing from %s", latest)
        return str(latest)
    return None
