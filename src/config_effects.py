"""Overrides that change nothing: a key set on the command line (or swept) that the composed job does not use.

The train config holds *source groups* (``process``, ``schedule``, ``objective``, ``sampler``, ``conditioning``,
``autoencoder``, ``guidance``, ``optimizer``, ``lr_schedule``): their values reach the run only where ``model.*`` interpolates
them (``model.diffusion.process: ${process}``,
vp's ``process: ${schedule}``). A choice or key of a source group can therefore be inert: ``schedule=linear`` under
``process=flow`` (flow does not read the schedule tables), ``objective=eps`` under ``process=flow`` (the process sets
the prediction itself). The *effective config* is the resolved config without the source groups (and without
``hydra``); an override is inert when another value in its place leaves the effective config unchanged, and a sweep
is degenerate when two of its jobs have the same effective config (same seed included). Both are refused at start in one
line, before Hydra writes anything (``difflab.preflight.ValidateConfig``).

Only source-group overrides are probed (each probe is one composition, about 0.1 s): every other key is read by the
code that builds the run, or refused already when its target does not take it (``configs/schema.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Sequence

from omegaconf import DictConfig

SOURCE_GROUPS = (
    "process",
    "schedule",
    "objective",
    "sampler",
    "guidance",
    "conditioning",
    "autoencoder",
    "optimizer",
    "lr_schedule",
    "method",
)
PROBE = "__difflab_probe__"  # a value no config uses: if it reaches the effective config, the key is read
PROBE_DIR = "/difflab-probe"  # the run directory of probe compositions (Hydra's default holds the time)

Compose = Callable[[Sequence[str]], DictConfig]


def effective(cfg: DictConfig) -> str:
    """The effective config of a composed train config, as canonical JSON: resolved (``${hydra:...}`` as the job
    sees it), without ``hydra`` and the source groups. Unresolvable values stay as their text."""
    from difflab.utils.resolve import hydra_runtime, plain

    with hydra_runtime(cfg) as resolved:
        tree = plain(resolved)
    for key in ("hydra", *SOURCE_GROUPS):
        tree.pop(key, None)
    return json.dumps(tree, sort_keys=True, default=str)


def _parse(override: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (parsed,) = OverridesParser.create().parse_overrides([override])
    return parsed


def source_group_of(override: str) -> str | None:
    """The source group an override sets (a group choice ``schedule=linear`` or a key ``process.shift=3``), or
    None for every other override."""
    parsed = _parse(override)
    if parsed.is_delete() or parsed.is_sweep_override():
        return None
    top = parsed.get_key_element().lstrip("+~").split(".")[0].split("@")[0]
    return top if top in SOURCE_GROUPS else None


def group_options(config_dir: str | Path, group: str) -> list[str]:
    """The options of a config group (its YAML files)."""
    return sorted(p.stem for p in (Path(config_dir) / group).glob("*.yaml"))


def alternatives(override: str, config_dir: str | Path) -> list[str]:
    """Overrides that put another value where ``override`` puts its own: the group's other options, or the probe
    value for a key."""
    parsed = _parse(override)
    key = parsed.get_key_element()
    value = parsed.get_value_element_as_str()
    if "." not in key.lstrip("+~"):  # a group choice
        return [f"{key}={o}" for o in group_options(config_dir, key.lstrip("+~")) if o != value]
    return [f"{key}={PROBE}"]


def is_inert(
    overrides: Sequence[str], index: int, compose: Compose, config_dir: str | Path, baseline: str | None = None
) -> bool:
    """Whether ``overrides[index]`` leaves the effective config as it is whatever value it takes (some alternative
    composes, and none composes to another effective config; alternatives that fail to compose say nothing)."""
    baseline = baseline if baseline is not None else effective(compose(overrides))
    composed = False
    for alternative in alternatives(overrides[index], config_dir):
        trial = [*overrides[:index], alternative, *overrides[index + 1 :]]
        try:
            if effective(compose(trial)) != baseline:
                return False
            composed = True
        except Exception as err:  # noqa: BLE001 - an option that does not compose here is no evidence either way,
            if "Could not override" in str(err):  # unless the run's own keys need this choice (guidance.guide_ckpt)
                return False
            continue
    return composed


def why_inert(override: str, cfg: DictConfig) -> str:
    """A reason a user can act on, from the composed config."""
    group = source_group_of(override) or ""
    process = (
        str((cfg.get("process") or {}).get("_target_", "")).rsplit(".", 1)[-1]
        if isinstance(cfg.get("process"), DictConfig)
        else ""
    )
    if group == "schedule" and process and process != "VPProcess":
        return (
            f"the schedule group holds the tables of process=vp, and this run's process is {process}; drop it, "
            f"or add process=vp"
        )
    if group == "objective":
        return (
            "this run's process sets the objective's prediction and the rest of the objective is the same for "
            "every choice; drop it, or choose a process that uses it (process=vp)"
        )
    return (
        f"nothing in this run reads `{override.split('=')[0].lstrip('+~')}` (its value is replaced or unused); drop it"
    )


def inert_overrides(overrides: Sequence[str], compose: Compose, config_dir: str | Path) -> list[tuple[str, str]]:
    """``(override, one line)`` for every source-group override of a run that changes nothing."""
    candidates = [i for i, o in enumerate(overrides) if source_group_of(o)]
    if not candidates:
        return []
    cfg = compose(overrides)
    baseline = effective(cfg)
    return [
        (overrides[i], f"{overrides[i]} changes nothing in this run: {why_inert(overrides[i], cfg)}")
        for i in candidates
        if is_inert(overrides, i, compose, config_dir, baseline)
    ]


def identical_jobs(jobs: Iterable[Sequence[str]], compose: Compose) -> tuple[int, int] | None:
    """The first pair of jobs (indices) of a sweep whose effective configs are equal (replicates differ in their
    seed, so they are not); None when every job differs."""
    seen: dict[str, int] = {}
    for i, overrides in enumerate(jobs):
        key = effective(compose(overrides))
        if key in seen:
            return seen[key], i
        seen[key] = i
    return None


def hydra_composer(config_name: str) -> Compose:
    """Compose ``config_name`` with overrides inside a running Hydra app (or an initialised ``GlobalHydra``), the
    run and sweep directories pinned so that compositions a second apart compare equal."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from difflab.configs import CONFIG_DIR

    pinned = [f"hydra.run.dir={PROBE_DIR}", f"hydra.sweep.dir={PROBE_DIR}"]

    def composed(overrides: Sequence[str]) -> DictConfig:
        if GlobalHydra.instance().is_initialized():
            return compose(config_name, overrides=[*overrides, *pinned], return_hydra_config=True)
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):  # called outside an app
            return compose(config_name, overrides=[*overrides, *pinned], return_hydra_config=True)

    return composed


def job_overrides(task: Sequence[str]) -> list[list[str]]:
    """Every job's overrides of a basic-sweeper sweep (the cartesian product of its ``a=1,2`` overrides, first key
    outermost, as Hydra numbers the jobs); [] when a swept value cannot be enumerated here (``glob``, ``interval``)."""
    from difflab.ablation.sweep import grid_points, sweep_axes

    axes, note = sweep_axes(list(task))
    if note or any(v is None for v in axes.values()):
        return []
    fixed = [o for o in task if not _parse(o).is_sweep_override()]
    return [[*fixed, *(f"{k}={v}" for k, v in point.items())] for point in grid_points(axes)]  # type: ignore[arg-type]
