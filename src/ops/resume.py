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
data loaders' position within the epoch, worker RNG included (``difflab.datamodules.loaders``). Settings whose state
that restore brings back (seed, learning rate, optimizer, LR schedule; the autoencoder's rate, betas, weight decay) or that the saved state counts in (the training
method and its ``fixed_on_resume`` settings) must equal the checkpoint run's: ``refuse_changed_settings``.
"""

from __future__ import annotations

import copy
import glob
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from difflab.checkpoints import load_checkpoint, migrate_config, run_config
from difflab.ops.atomic import TMP_SUFFIX
from difflab.ops.fsdp import sharded_checkpoint_dir
from difflab.utils.errors import CheckpointError, ConfigError
from difflab.utils.resolve import MISSING, UNRESOLVED, at, echoes, hydra_runtime, leaves, plain, shown

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


# ---------------------------------------------------------------------------------------- what a resume cannot change
RESTORED_SETTINGS = {  # the key a user types -> where a run config holds it; a resume brings their state back
    "seed": "seed",  # the RNG states
    "model.lr": "model.lr",  # the optimizer's param groups
    "model.betas": "model.betas",  # the same, for a module that builds its own optimizer (the autoencoder)
    "model.weight_decay": "model.weight_decay",
    "optimizer": "model.optimizer",
    "lr_schedule": "model.lr_schedule",  # the schedule's step count, under the new rule
}
WHY = "a resume restores the RNG, optimizer, LR-schedule and training-method state of the checkpoint, which would not follow"
Change = tuple[str, Any, Any]  # (key as typed, the checkpoint run's value, this run's value)


def stored_config(checkpoint: dict) -> dict | None:
    """A copy of the run config a loaded checkpoint holds, in today's layout (None without one): a diffusion
    checkpoint's ``difflab.config``; an autoencoder's ``difflab.run_config`` (its ``config`` rebuilds the model)."""
    meta = checkpoint.get("difflab")
    if isinstance(meta, dict) and isinstance(meta.get("run_config"), dict):
        return migrate_config(copy.deepcopy(meta["run_config"]))
    try:
        return run_config({"difflab": copy.deepcopy(checkpoint.get("difflab"))})
    except (CheckpointError, AttributeError, TypeError):
        return None


def stored_run_config(path: str | Path) -> dict | None:
    """``stored_config`` of a checkpoint file, read on the meta device without tensor data (a sharded checkpoint's
    committed file holds it too); None when it holds none or cannot be read (``check_readable`` reports that)."""
    try:
        ckpt = torch.load(path, map_location="meta", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable: the resume's own check names the problem
        return None
    return stored_config(ckpt) if isinstance(ckpt, dict) else None


def _known(value: Any) -> bool:
    return value is not MISSING and value is not UNRESOLVED


def _changes(key: str, was: Any, now: Any) -> list[Change]:
    """The leaves of a settings node whose values differ (a changed class alone); a node or key one side lacks (a
    checkpoint of an older layout) or this run cannot resolve yet is not compared."""
    if was is None or now is None:
        return []
    if not isinstance(was, dict) or not isinstance(now, dict):
        return [(key, was, now)] if _known(now) and was != now else []
    if "_target_" in was and "_target_" in now and was["_target_"] != now["_target_"]:
        return [(f"{key}._target_", was["_target_"], now["_target_"])]
    old, new = leaves(was, key), leaves(now, key)
    return [(k, old[k], v) for k, v in new.items() if k in old and _known(v) and old[k] != v]


def _fixed_on_resume(target: Any) -> tuple[str, ...]:
    """The ``fixed_on_resume`` settings of this run's method class (none for a class that cannot be looked up)."""
    from hydra.utils import get_object

    try:
        return tuple(getattr(get_object(str(target)), "fixed_on_resume", ()))
    except (ImportError, ValueError, AttributeError):
        return ()


def _method_changes(was: Any, now: Any) -> list[Change]:
    """Another training method, or a change of the settings its saved state counts in (``fixed_on_resume``)."""
    if not isinstance(was, dict) or not isinstance(now, dict) or "_target_" not in was or "_target_" not in now:
        return []
    if was["_target_"] != now["_target_"]:
        return [("method._target_", was["_target_"], now["_target_"])]
    fixed = _fixed_on_resume(now["_target_"])
    return [
        (f"method.{k}", was[k], now[k]) for k in fixed if k in was and k in now and _known(now[k]) and was[k] != now[k]
    ]


def changed_settings(stored: dict, current: dict, raw: dict | None = None) -> list[Change]:
    """The settings of ``current`` (a run config as plain values) that differ from ``stored`` (the checkpoint run's)
    where a resume would not apply them as asked: ``RESTORED_SETTINGS`` and the training method with its
    ``fixed_on_resume`` settings. With ``raw`` (``current`` unresolved), a key that only repeats another changed key
    (``lr_schedule.period: ${method.steps_per_round}``) is left out: one change, one entry."""
    changes = _method_changes(at(stored, "model.method"), at(current, "model.method"))
    for key, node in RESTORED_SETTINGS.items():
        changes += _changes(key, at(stored, node), at(current, node))
    if raw is not None:
        keys = [k for k, _, _ in changes]
        changes = [c for c in changes if not any(echoes(at(raw, c[0]), k) for k in keys if k != c[0])]
    return changes


def config_dirs(cfg: DictConfig) -> list[Path]:
    """The config directories a composed run searched: the package's, then those of ``--config-dir`` and
    ``hydra.searchpath`` (the ``file://`` sources Hydra records in ``hydra.runtime.config_sources``)."""
    from difflab.configs import CONFIG_DIR

    dirs = [Path(CONFIG_DIR)]
    cwd = OmegaConf.select(cfg, "hydra.runtime.cwd") or "."  # a relative searchpath entry is the launch directory's
    for source in OmegaConf.select(cfg, "hydra.runtime.config_sources") or []:
        if source.get("schema") == "file" and source.get("path"):
            dirs.append((Path(str(cwd)) / str(source.get("path"))).resolve())
    return list(dict.fromkeys(dirs))


def _option_of(group: str, target: Any, dirs: list[Path]) -> str | None:
    """The option of config group ``group`` whose file builds ``target`` (None unless exactly one does); an option
    name is the first file of that name in ``dirs``, searched in Hydra's order."""
    line = re.compile(rf"^\s*_target_:\s*{re.escape(str(target))}\s*(#.*)?$", re.M)
    options: dict[str, Path] = {}
    for folder in dirs:
        for path in sorted((folder / group).glob("*.yaml")):
            options.setdefault(path.stem, path)
    found = [name for name, path in options.items() if line.search(path.read_text(errors="replace"))]
    return found[0] if len(found) == 1 else None


def _as_override(key: str, value: Any, dirs: list[Path]) -> str:
    """``key=value`` as typed; a changed class as its group's option (``lr_schedule=constant``) where one builds it."""
    if key.endswith("._target_"):
        group = key[: -len("._target_")]
        option = _option_of(group, value, dirs)
        if option is not None:
            return f"{group}={option}"
    return f"{key}={shown(value).replace(', ', ',').replace(': ', ':')}"  # one shell word: [0.9,0.999]


def refuse_changed_settings(
    where: str, stored: dict | None, current: dict | None, raw: dict | None = None, dirs: list[Path] | None = None
) -> None:
    """Raise the one-line ConfigError naming every ``changed_settings`` entry with both values (``where``: what is
    being resumed), or return when there is none; a changed class is named as an option of ``dirs``' groups."""
    from difflab.configs import CONFIG_DIR

    changes = changed_settings(stored, current, raw) if stored and current else []
    dirs = dirs or [Path(CONFIG_DIR)]
    if changes:
        before = " ".join(f"{k}={shown(v)}" for k, v, _ in changes)
        after = " ".join(f"{k}={shown(v)}" for k, _, v in changes)
        fix = " ".join(_as_override(k, v, dirs) for k, v, _ in changes)
        raise ConfigError(
            f"{where}: its run trained with {before} and this run has {after} ({WHY}): resume with {fix}, or start "
            "a new run (init_from= keeps the weights)"
        )


def refuse_changed_resume(ckpt_path: str | Path, cfg: DictConfig) -> None:
    """``refuse_changed_settings`` for resuming the checkpoint file ``ckpt_path`` under the composed ``cfg``: the
    pre-flight calls it for a single run before Hydra writes anything and for a sweep job as it starts,
    ``pipeline.train`` before building any run (in-process runs meet it only there)."""
    stored = stored_run_config(ckpt_path)
    if stored is None:
        return
    with hydra_runtime(cfg) as resolved:
        current = plain(resolved)
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw_dict = raw if isinstance(raw, dict) else None
    refuse_changed_settings(f"resuming {ckpt_path}", stored, current, raw_dict, config_dirs(cfg))
