"""Make Hydra multirun (``-m``) work with Lightning's DDP subprocess launcher (Lightning#11300, open in 2.6).

Lightning starts ranks 1..N-1 by re-running ``sys.argv``: in a sweep every child gets the whole ``-m a,b,c`` sweep
and replays it, so jobs hang or ranks train different configs. The fix, applied by ``install()``:

- a child runs the script with *the current job's* overrides (``HydraConfig.get().overrides.task``) plus
  ``hydra.run.dir=<this job's output dir>``, in run mode (no ``-m``);
- after each job (``end_job``) the launcher's children are awaited, the process group is destroyed and the
  variables the launcher exported (LOCAL_RANK, NODE_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) are removed, else
  the next job believes it was launched externally and waits forever for ranks that never come.

This patches the private ``_hydra_subprocess_cmd`` of ``lightning.fabric`` and ``lightning.pytorch``'s
``subprocess_script`` launchers; lightning is pinned to 2.6.x and ``tests/test_ops_ddp.py`` checks the hook.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any, Sequence

log = logging.getLogger(__name__)

LAUNCHER_ENV_VARS = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_PATCHED_MODULES = (
    "lightning.fabric.strategies.launchers.subprocess_script",
    "lightning.pytorch.strategies.launchers.subprocess_script",
)
# Hydra flags that choose the primary config; a child must see the same ones.
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def _quote(value: str) -> str:
    """Quote a value for Hydra's override grammar (paths may hold '=', ',', ':' or spaces)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _config_flags(argv: Sequence[str]) -> list[str]:
    """The ``--config-name/-cn``, ``--config-path/-cp``, ``--config-dir/-cd`` flags of ``argv`` (both spellings)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        flag = arg.split("=", 1)[0]
        if flag in _CONFIG_FLAGS:
            if "=" in arg:
                out.append(arg)
            elif i + 1 < len(argv):
                out += [arg, argv[i + 1]]
                i += 1
        i += 1
    return out


def script_command() -> list[str]:
    """How this process was started: ``python -m pkg`` or ``python /abs/script.py``."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is not None and spec.name:
        return [sys.executable, "-m", spec.name]
    from hydra.utils import to_absolute_path

    return [sys.executable, to_absolute_path(sys.argv[0])]


def child_command(local_rank: int) -> tuple[list[str], str]:
    """Command and cwd for DDP rank ``local_rank`` of the *current Hydra job* (single run or one sweep job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hc = HydraConfig.get()
    out_dir = str(hc.runtime.output_dir)
    cmd = script_command() + _config_flags(sys.argv[1:]) + list(hc.overrides.task)
    cmd += [
        f"hydra.run.dir={_quote(out_dir)}",
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
        "hydra.output_subdir=null",
    ]  # rank 0 already wrote <out>/.hydra
    handlers = (hc.job_logging or {}).get("handlers") or {}
    if "filename" in (handlers.get("file") or {}):  # one log file per rank instead of all ranks appending to one
        log_file = os.path.join(out_dir, f"{hc.job.name}_rank{local_rank}.log")
        cmd.append(f"hydra.job_logging.handlers.file.filename={_quote(log_file)}")
    return cmd, get_original_cwd()


def _child_command_hook(local_rank: int) -> tuple[Sequence[str], str]:
    return child_command(local_rank)


def install() -> None:
    """Replace Lightning's child-command builder in both launchers (idempotent)."""
    import importlib

    for name in _PATCHED_MODULES:
        mod = importlib.import_module(name)
        if not hasattr(mod, "_hydra_subprocess_cmd"):
            import lightning

            raise RuntimeError(
                f"lightning {lightning.__version__}: {name} has no _hydra_subprocess_cmd any more; "
                f"update src/ops/ddp_multirun.py (the DDP + multirun fix) for this version"
            )
        mod._hydra_subprocess_cmd = _child_command_hook


def is_installed() -> bool:
    import importlib

    return all(
        getattr(importlib.import_module(n), "_hydra_subprocess_cmd", None) is _child_command_hook
        for n in _PATCHED_MODULES
    )


def end_job(trainer: Any = None, timeout_s: float = 120.0) -> None:
    """After a (possibly failed) job: wait for the DDP children this process started, destroy the process group and
    remove the launcher's environment variables, so that the next sweep job starts a fresh DDP world."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    procs: list[subprocess.Popen] = list(getattr(launcher, "procs", None) or [])
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("DDP child %d still running %.0f s after the job ended; terminating it", proc.pid, timeout_s)
            proc.kill()
            proc.wait()
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as err:  # noqa: BLE001 - cleanup must not hide the job's own error
        log.warning("could not destroy the process group: %s", err)
    if procs:  # this process launched the children and exported the variables itself
        for var in LAUNCHER_ENV_VARS:
            os.environ.pop(var, None)
