"""The pre-flight every command runs before Hydra writes anything (a Hydra callback, ``hydra.callbacks`` in
``configs/hydra/default.yaml``): the values of the composed config (``difflab.config_checks``), overrides that change
nothing and sweeps whose jobs are one run (``difflab.config_effects``), a run directory a live run holds
(``difflab.ops.run_lock``), a resume whose checkpoint is unreadable or trained under settings the run changes
(``difflab.ops.resume``); under ``--validate`` it then describes the run and exits (``difflab.validate_mode``). Hydra
writes a sweep job's ``.hydra/`` before any callback sees the job: a job refused as it starts gets back the files of
the run that was in its directory (``sweep_records``)."""

from __future__ import annotations

import functools
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from difflab import validate_mode
from difflab.config_checks import interpolated_keys, validate_or_exit
from difflab.config_effects import hydra_composer, identical_jobs, inert_overrides, job_overrides
from difflab.configs import CONFIG_DIR
from difflab.utils.cli import requested
from difflab.utils.errors import fail


def _config_name(config: DictConfig) -> str | None:
    return OmegaConf.select(config, "hydra.job.config_name", default=None)


def _swept_keys(config: DictConfig) -> tuple[str, ...]:
    """Keys a multirun's jobs set (``key=a,b`` overrides, ``hydra.sweeper.params`` and the keys interpolating them):
    unknown before each job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.key_or_group for o in overrides if o.is_sweep_override()]
    keys += list(OmegaConf.select(config, "hydra.sweeper.params", default=None) or {})
    swept = tuple(k.lstrip("+~") for k in keys)
    return swept + _keys_interpolating(config, swept)


def _keys_interpolating(config: DictConfig, swept: tuple[str, ...]) -> tuple[str, ...]:
    """Keys whose value interpolates a swept key, a key below it or the node holding it, directly or through other
    keys (``ckpt_path=<dir>/s${seed}/last.ckpt`` with ``seed=0,1,2``; ``${guidance}`` with ``guidance.scale=1,2``)."""
    raw = OmegaConf.to_container(config, resolve=False)
    values = {}
    for key in interpolated_keys(config):
        if not key.startswith("hydra."):
            values[key] = str(functools.reduce(lambda node, part: node[part], key.split("."), raw))
    found: set[str] = set()
    unknown = set(swept)
    while unknown:
        below = "|".join(re.escape(k) for k in sorted(unknown))  # the key itself or a key under it
        parts = {k.rsplit(".", i)[0] for k in unknown for i in range(1, k.count(".") + 1)}
        above = "|".join(re.escape(k) for k in sorted(parts)) or "(?!)"  # a node holding it, as a whole
        refers = re.compile(rf"\$\{{[^}}]*(?<![\w.])(?:(?:{below})(?![\w])|(?:{above})(?![\w.]))")
        unknown = {k for k, v in values.items() if k not in found and refers.search(v)}
        found |= unknown
    return tuple(sorted(found))


def refuse_inert_overrides(task: list[str], config_name: str = "train") -> None:
    """Exit with one line when an override of the command line changes nothing in the composed run
    (``difflab.config_effects``)."""
    inert = inert_overrides(task, hydra_composer_for(config_name), CONFIG_DIR)
    if inert:
        fail(inert[0][1])


def hydra_composer_for(primary: str | None):
    return hydra_composer(primary or "train")


def refuse_degenerate_sweep(jobs: list[list[str]], config_name: str = "train") -> None:
    """Exit with one line before any job of a sweep starts: when a job sets a source-group value that changes
    nothing in it, or when two jobs compose to the same run (the seed apart), naming the jobs."""
    if not jobs:
        return
    compose = hydra_composer_for(config_name)
    for i, overrides in enumerate(jobs):
        inert = inert_overrides(overrides, compose, CONFIG_DIR)
        if inert:
            fail(f"job {i} of this sweep ({' '.join(overrides)}): {inert[0][1]}")
    pair = identical_jobs(jobs, compose) if len(jobs) > 1 else None
    if pair is not None:
        a, b = pair
        differ = [o for o in jobs[b] if o not in jobs[a] and not o.startswith("seed=")]
        fail(
            f"jobs {a} and {b} of this sweep compose to the same run ({' '.join(jobs[a])} vs {' '.join(jobs[b])}): "
            f"{', '.join(differ) or 'their overrides'} {'changes' if len(differ) == 1 else 'change'} nothing "
            f"here, so the sweep would train identical models; sweep a key the run uses"
        )


@contextmanager
def _validate_mode_cannot_be_skipped() -> Iterator[None]:
    """Hydra turns an exception in a callback into a warning and goes on: under ``--validate`` that would start the
    run, so any failure there ends the command in one line instead."""
    try:
        yield
    except Exception as err:
        if not requested():
            raise

        fail(
            f"--validate could not finish ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"nothing was started or written"
        )


def unfit_run_dir(config: DictConfig, run_dir: str) -> str | None:
    """Why ``pipeline.train`` will refuse this run before writing, or None: a live run holds ``run_dir``
    (``difflab.ops.run_lock``), or the checkpoint to resume cannot be read or was trained under settings this run
    changes (``difflab.ops.resume.refuse_changed_resume``)."""
    from difflab.ops import resume
    from difflab.ops.run_lock import ensure_run_dir_free
    from difflab.utils.errors import DifflabError

    quiet = logging.getLogger(resume.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # resume=auto's notes are logged once, by the run itself
    try:
        ensure_run_dir_free(run_dir)
        ckpt = resume.resolve_resume(config.get("ckpt_path"), config.get("resume"), run_dir)
        if ckpt:
            resume.refuse_changed_resume(ckpt, config)
    except DifflabError as err:
        return str(err)
    finally:
        quiet.setLevel(level)
    return None


def refuse_unfit_resume(config: DictConfig, run_dir: str) -> None:
    """Exit with one line (``unfit_run_dir``) before Hydra writes a single run's ``.hydra/`` into ``run_dir``."""
    reason = unfit_run_dir(config, run_dir)
    if reason:
        fail(reason)


LOCAL_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def sweep_records(config: DictConfig) -> dict[Path, bytes]:
    """The files Hydra rewrites when a train sweep runs again in an existing sweep directory (``multirun.yaml``, each
    job's ``.hydra/``), read before it does, so that a job refused as it starts can have its own put back. Only under
    the local launcher: a cluster launcher's jobs run in other processes, at other times, beside live ones."""
    if OmegaConf.select(config, "hydra.launcher._target_") != LOCAL_LAUNCHER:
        return {}
    sweep_dir, subdir = (OmegaConf.select(config, f"hydra.{key}") for key in ("sweep.dir", "output_subdir"))
    root = Path(sweep_dir).resolve() if sweep_dir else None
    if not subdir or root is None or not root.is_dir():
        return {}
    found = [root / "multirun.yaml", *(p for p in root.rglob("*.yaml") if p.parent.name == Path(subdir).name)]
    return {p: p.read_bytes() for p in found if p.is_file()}


def put_back(records: dict[Path, bytes], folders: list[Path]) -> None:
    """Write the recorded bytes of each file directly in ``folders`` back (atomically) where Hydra has just
    overwritten them."""
    from difflab.ops.atomic import atomic_write

    for path, data in records.items():
        if path.parent in folders and path.exists() and path.read_bytes() != data:
            atomic_write(path, functools.partial(Path.write_bytes, data=data))


class ValidateConfig(Callback):
    """Hydra callback: validate the config before Hydra writes anything (``on_run_start``: no run directory, no
    .hydra/, no log file for a bad single run); a multirun is checked once up front for the keys no job changes (not
    swept, not interpolating a swept key) and then per job (``on_job_start``), as each job's values are known only
    then."""

    def __init__(self, **_: Any) -> None:
        self._records: dict[Path, bytes] = {}  # a train sweep's files Hydra rewrites (``sweep_records``)
        self._sweep_root = Path()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with _validate_mode_cannot_be_skipped():
            self._run_start(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with _validate_mode_cannot_be_skipped():
            self._multirun_start(config)

    def _run_start(self, config: DictConfig) -> None:
        primary = _config_name(config)
        validate_or_exit(config, primary)
        if primary == "train":
            refuse_inert_overrides(list(config.hydra.overrides.task))
            refuse_unfit_resume(config, OmegaConf.select(config, "hydra.run.dir"))
        if requested():
            validate_mode.report(config, primary)

    def _multirun_start(self, config: DictConfig) -> None:
        primary = _config_name(config)
        validate_or_exit(config, primary, ignore=_swept_keys(config))
        jobs = job_overrides(list(config.hydra.overrides.task))
        if primary == "train":
            refuse_degenerate_sweep(jobs)
            self._records = sweep_records(config)
            self._sweep_root = Path(OmegaConf.select(config, "hydra.sweep.dir") or ".").resolve()
        if requested():
            for overrides in jobs:  # every job's values, as on_job_start would check them
                validate_or_exit(hydra_composer_for(primary)(overrides), primary)
            validate_mode.report(config, primary, jobs)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.get("mode") != RunMode.MULTIRUN:
            return
        primary = _config_name(config)
        try:
            validate_or_exit(config, primary)
            if primary == "train":
                reason = unfit_run_dir(config, OmegaConf.select(config, "hydra.runtime.output_dir"))
                if reason:
                    fail(reason)
        except SystemExit:
            try:
                self._put_back_job_files(config)
            except OSError as err:  # the refusal stands; the files could not be put back
                logging.getLogger(__name__).warning("could not put back the refused job's .hydra/ files: %s", err)
            raise

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self._records:  # read again for the next job: what this job wrote is now the directory's record
            self._records = sweep_records(config)

    def _put_back_job_files(self, config: DictConfig) -> None:
        """Hydra rewrites a job's ``.hydra/`` (and the sweep's ``multirun.yaml``) before any callback sees the job: a
        job refused here gets the files of the run that was there before (``multirun.yaml`` too when it is the sweep's
        first job, so that nothing of this sweep ran)."""
        if not self._records:
            return
        run_dir = Path(OmegaConf.select(config, "hydra.runtime.output_dir")).resolve()
        folders = [run_dir / Path(OmegaConf.select(config, "hydra.output_subdir")).name]
        if OmegaConf.select(config, "hydra.job.num") == 0:
            folders.append(self._sweep_root)
        put_back(self._records, folders)
