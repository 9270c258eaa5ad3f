"""Weights & Biases logger for difflab runs: names from the experiment and sweep, one W&B run per job, resumable.

- project from the config; run name ``<experiment>`` (single run) or ``<experiment>/<job overrides>`` (sweep job);
  group ``<experiment>`` or ``<experiment>-sweep-<sweep dir name>`` so a sweep's jobs sit together;
- the run id is stored in ``<run>/wandb_run_id.txt``: a resumed run (same run directory) continues the same W&B
  run (``resume="allow"``);
- ``finish()`` is called after every job (``train.py``, in a ``finally``), so sweep jobs never merge into one run;
- ``WANDB_MODE=offline`` works without an account (``wandb sync <run>/wandb/offline-run-*`` uploads later).
"""

from __future__ import annotations

import logging
import re
import secrets
import string
import sys
from pathlib import Path
from typing import Any, Sequence

from difflab.ops.atomic import write_text
from difflab.trust import config_target

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id.txt"


def swept_keys(argv: Sequence[str]) -> set[str]:
    """Keys that a command line sweeps over (``model.lr=1e-4,2e-4``, ``experiment=glob(*)``, ``x=range(3)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, keys = OverridesParser.create(), set()
    for arg in argv:
        if arg.startswith("-"):
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001 - not an override (e.g. a flag's value)
            continue
        if override.is_sweep_override():
            keys.add(override.key_or_group)
    return keys


def _hydra_info() -> dict[str, Any]:
    """Experiment choice, multirun flag, sweep dir name and this job's swept overrides, from HydraConfig if set."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
        swept = swept_keys(sys.argv[1:])
        parser = OverridesParser.create()
        job = [o for o in hc.overrides.task if parser.parse_override(o).key_or_group in swept]
        return {
            "experiment": hc.runtime.choices.get("experiment"),
            "multirun": hc.mode == RunMode.MULTIRUN,
            "sweep": Path(str(hc.sweep.dir)).name,
            "job_num": hc.job.get("num"),
            "swept": swept,
            "job_overrides": ",".join(job),
        }
    except Exception:  # noqa: BLE001 - naming is cosmetic, never fail a run on it
        return {}


def run_names(name: str | None, group: str | None) -> tuple[str | None, str | None]:
    """Run name and group: explicit values win, else derived from the experiment and the sweep.

    Single run: name = group = ``<experiment>``. Sweep job: name ``<experiment>/<swept key=value,...>``, group
    ``<experiment>-sweep-<sweep dir name>`` (``sweep-<sweep dir name>`` when the experiment itself is swept).
    """
    info = _hydra_info()
    exp = info.get("experiment") or "run"
    multirun = bool(info.get("multirun"))
    if name is None:
        name = exp
        if multirun:
            name = f"{exp}/{info.get('job_overrides') or 'job' + str(info.get('job_num'))}"
        name = name[:128]
    if group is None:
        if multirun:
            group = (
                f"sweep-{info['sweep']}" if "experiment" in info.get("swept", ()) else f"{exp}-sweep-{info['sweep']}"
            )
        else:
            group = exp
    return name, group


def run_id(save_dir: str | Path) -> str:
    """The W&B run id of this run directory: read from ``wandb_run_id.txt``, or created and stored there."""
    path = Path(save_dir) / RUN_ID_FILE
    if path.is_file():
        rid = path.read_text().strip()
        if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", rid):
            return rid
        log.warning("ignoring malformed W&B run id in %s", path)
    # a W&B-style id (8 chars of [a-z0-9]); drawn from `secrets` so the training RNG streams are not touched
    rid = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, rid + "\n")
    return rid


@config_target
def wandb_logger(
    save_dir: str,
    project: str = "difflab",
    name: str | None = None,
    group: str | None = None,
    entity: str | None = None,
    tags: Sequence[str] | None = None,
    job_type: str = "train",
    log_model: bool | str = False,
    mode: str | None = None,
    **kwargs: Any,
):
    """A Lightning ``WandbLogger`` with difflab naming and a run id persisted in ``save_dir`` (see module doc)."""
    from lightning.pytorch.loggers import WandbLogger

    name, group = run_names(name, group)
    rid = run_id(save_dir)
    if mode is not None:
        kwargs["mode"] = mode
    return WandbLogger(
        project=project,
        name=name,
        group=group,
        entity=entity,
        tags=list(tags or []),
        job_type=job_type,
        save_dir=save_dir,
        id=rid,
        resume="allow",
        log_model=log_model,
        **kwargs,
    )


def finish(failed: bool = False) -> None:
    """Close the active W&B run, if any (call after every job so that sweep jobs never share a run)."""
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
