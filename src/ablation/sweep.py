"""Read a Hydra multirun directory: the sweep's grid, and each job's overrides, status and logged metrics.

Layout (``python train.py -m process=vp,edm seed=0,1,2``; configs/hydra/default.yaml):

    <sweep>/multirun.yaml                  the sweep's config; hydra.overrides.task = the command-line overrides
    <sweep>/<n>/.hydra/overrides.yaml      job n's overrides (``process=vp``, ``seed=0``)
    <sweep>/<n>/.hydra/config.yaml         job n's composed config
    <sweep>/<n>/csv/metrics.csv            Lightning CSVLogger rows (sparse: one row per logging call)
    <sweep>/<n>/final_metrics.json         written when the job ends normally; absent = still running or failed
    <sweep>/<n>/metrics/protocol.json      how each Frechet/KID metric was measured (optional)

Overrides are parsed with Hydra's own override grammar, so the expected grid is the cartesian product that Hydra's
basic sweeper launched, in the same order (job ``n`` is grid point ``n``).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difflab.trust import without_resolvers
from difflab.utils.errors import DataNotFoundError

SEED_KEY = "seed"
CSV_PATH = Path("csv") / "metrics.csv"
FINAL_PATH = Path("final_metrics.json")
PROTOCOL_PATH = Path("metrics") / "protocol.json"
OVERRIDES_PATH = Path(".hydra") / "overrides.yaml"
CONFIG_PATH = Path(".hydra") / "config.yaml"
NOT_METRIC_COLUMNS = frozenset({"epoch", "step"})
UNFINISHED = "unfinished"
HOW_TO_SWEEP = "give the directory printed by `python train.py -m ...`"


@dataclass
class Job:
    """One job of the sweep: where it is, what it overrode, how it ended and what it logged."""

    name: str
    path: Path
    overrides: dict[str, str]
    status: str
    series: dict[str, list[tuple[int, float]]]
    protocol: dict[str, dict]
    seed: str | None
    eval_seed: Any = None
    eval_n: Any = None
    config: dict | None = None  # the job's composed config: references resolved, resolver calls kept as text

    @property
    def finished(self) -> bool:
        """Whether the job ended normally (it wrote final_metrics.json)."""
        return self.status != UNFINISHED

    @property
    def last_step(self) -> int | None:
        """The largest step at which the job logged anything; None if it logged nothing."""
        steps = [s[-1][0] for s in self.series.values() if s]
        return max(steps) if steps else None


@dataclass
class Sweep:
    """A multirun directory: its jobs, the keys it swept and (for a basic-sweeper grid) the expected grid points."""

    path: Path
    jobs: list[Job]
    swept_keys: list[str]
    sweeper: str
    grid: list[dict[str, str]] | None = None
    grid_note: str = ""
    sweep_values: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def missing_points(self) -> list[tuple[int, dict[str, str]]]:
        """Grid points (with the job number Hydra gave them) that no job directory covers."""
        if self.grid is None:
            return []
        found = {_point_key(job.overrides, self.swept_keys) for job in self.jobs}
        return [(i, p) for i, p in enumerate(self.grid) if _point_key(p, self.swept_keys) not in found]


def _point_key(values: dict[str, str], keys: list[str]) -> tuple:
    """The values of ``keys`` as a hashable tuple (None for an absent key)."""
    return tuple(values.get(k) for k in keys)


# ---------------------------------------------------------------------------------------------------------- overrides


def _parser():
    """Hydra's override parser (imported here: the CLI module must stay light)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def plain_key(key_element: str) -> str:
    """An override's key without its ``+``/``++``/``~`` prefix: ``+model.x`` and ``model.x`` name the same value."""
    return key_element.lstrip("+~")


def parse_job_overrides(lines: list[str]) -> dict[str, str]:
    """A job's override strings as ``{key: value}`` with Hydra's canonical value text (``seed=0`` -> ``{"seed": "0"}``).

    A line the grammar rejects is split at its first ``=`` so one odd override cannot hide the job.
    """
    parser = _parser()
    result: dict[str, str] = {}
    for line in lines:
        line = str(line)
        try:
            (ov,) = parser.parse_overrides([line])
            key = plain_key(ov.get_key_element())
            value = "~" if ov.is_delete() and ov.value() is None else ov.get_value_element_as_str()
        except Exception:  # noqa: BLE001 - any grammar error: fall back to the raw text
            key, _, value = line.partition("=")
            key = plain_key(key)
        result[key] = value
    return result


def sweep_axes(override_lines: list[str]) -> tuple[dict[str, list[str] | None], str]:
    """The swept keys of a sweep's overrides in Hydra's order, each with its values in launch order.

    A key's values are None when the sweep cannot be enumerated here (``glob(...)`` needs the config tree,
    ``interval(...)`` is continuous); the second result then says why no grid can be drawn. A later override of the
    same key replaces an earlier one but keeps its position, as in Hydra's basic sweeper.
    """
    parser = _parser()
    axes: dict[str, list[str] | None] = {}
    notes = []
    for ov in parser.parse_overrides([str(x) for x in override_lines]):
        key = plain_key(ov.get_key_element())
        if not ov.is_sweep_override():
            axes.pop(key, None)  # a fixed value given after a sweep of the same key replaces it
            continue
        try:
            raw = list(ov.sweep_string_iterator())
        except Exception:  # noqa: BLE001 - glob / interval sweeps are not enumerable without Hydra's config loader
            axes[key] = None
            notes.append(f"`{ov.input_line}` cannot be enumerated")
            continue
        axes[key] = [parse_job_overrides([f"{ov.get_key_element()}={v}"])[key] for v in raw]
    return axes, "; ".join(notes)


def grid_points(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """The cartesian product of the axes, first key outermost: the order Hydra numbers the jobs in."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def differing_keys(jobs: list[Job]) -> list[str]:
    """Keys whose override value is not the same in every job (the swept keys when the sweep does not say)."""
    keys: list[str] = []
    for job in jobs:
        keys.extend(k for k in job.overrides if k not in keys)
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


# ---------------------------------------------------------------------------------------------------------- job files


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Per metric column, the sorted ``(step, value)`` pairs of a CSVLogger file.

    Rows are sparse (a row holds only what one logging call logged) and a step can recur (several calls, or a resumed
    run re-logging): the last row wins. Empty, unparsable and NaN cells are skipped.
    """
    by_metric: dict[str, dict[int, float]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = _number(row.get("step"))
            if step is None:
                continue
            for column, cell in row.items():
                if column is None or column in NOT_METRIC_COLUMNS:
                    continue
                value = _number(cell)
                if value is not None:
                    by_metric.setdefault(column, {})[int(step)] = value
    return {m: sorted(v.items()) for m, v in by_metric.items()}


def _number(cell: Any) -> float | None:
    """A finite float from a CSV cell, or None for empty / non-numeric / NaN cells."""
    if cell is None or isinstance(cell, list):
        return None
    try:
        value = float(cell)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def _read_json(path: Path, warnings: list[str]) -> Any:
    """A JSON file's content, or None if absent or unreadable (the latter noted in ``warnings``)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        warnings.append(f"{path} could not be read ({err.__class__.__name__}); treated as absent")
        return None


def _read_yaml(path: Path, warnings: list[str]):
    """An OmegaConf tree of a YAML file in which references to other keys of the file resolve, and resolver calls
    (``${oc.env:...}`` in someone's job config) stay text, never run (``difflab.trust.without_resolvers``); None if
    absent or unreadable."""
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.create(without_resolvers(OmegaConf.to_container(OmegaConf.load(path), resolve=False)))
    except Exception as err:  # noqa: BLE001 - a damaged file must not hide the rest of the sweep
        warnings.append(f"{path} could not be read ({err.__class__.__name__}); treated as absent")
        return None


def _read_override_lines(path: Path, warnings: list[str]) -> list[str]:
    """A job's ``.hydra/overrides.yaml`` as plain strings (``${...}`` kept as written, never resolved)."""
    import yaml

    try:
        lines = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as err:
        warnings.append(f"{path} could not be read ({err.__class__.__name__}); overrides unknown")
        return []
    return [str(x) for x in lines] if isinstance(lines, list) else []


def _select(cfg, key: str, resolve: bool = True) -> Any:
    """``cfg[key]`` (dotted; references within the file resolved unless ``resolve=False``, ``_read_yaml`` keeps
    resolver calls as text), or None when absent or unresolvable."""
    if cfg is None:
        return None
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001
        return None
    if not OmegaConf.is_config(value):
        return value
    try:
        return OmegaConf.to_container(value, resolve=resolve)
    except Exception:  # noqa: BLE001
        return None


def _job_status(final: Any) -> str:
    """``completed`` / ``stopped`` (as final_metrics.json says) or ``unfinished`` when the file is absent."""
    if not isinstance(final, dict):
        return UNFINISHED
    return str(final.get("status") or "completed")


def _final_series(final: Any) -> dict[str, list[tuple[int, float]]]:
    """final_metrics.json's metrics as one-point series (for a job that ended without a CSV log)."""
    if not isinstance(final, dict) or not isinstance(final.get("metrics"), dict) or final.get("step") is None:
        return {}
    step = int(final["step"])
    out = {}
    for metric, value in final["metrics"].items():
        v = _number(value)
        if v is not None:
            out[metric] = [(step, v)]
    return out


def _eval_setting(protocol: dict, cfg, field_name: str, config_key: str) -> Any:
    """An evaluation setting (seed / sample count) from the metric protocol, else from the job's config."""
    values = {
        json.dumps(entry.get(field_name))
        for entry in protocol.values()
        if isinstance(entry, dict) and entry.get(field_name) is not None
    }
    if len(values) == 1:
        return json.loads(values.pop())
    if len(values) > 1:
        return "mixed"
    return _select(cfg, config_key)


def read_job(path: Path, warnings: list[str]) -> Job:
    """Everything the summary needs from one job directory."""
    overrides = parse_job_overrides(_read_override_lines(path / OVERRIDES_PATH, warnings))
    cfg = _read_yaml(path / CONFIG_PATH, warnings)
    final = _read_json(path / FINAL_PATH, warnings)
    series: dict[str, list[tuple[int, float]]] = {}
    csv_path = path / CSV_PATH
    if csv_path.is_file():
        try:
            series = read_metrics_csv(csv_path)
        except (OSError, csv.Error, UnicodeDecodeError) as err:
            warnings.append(f"{csv_path} could not be read ({err.__class__.__name__}); no metrics used from it")
    if not series:
        series = _final_series(final)
    protocol = _read_json(path / PROTOCOL_PATH, warnings)
    protocol = {k: v for k, v in protocol.items() if isinstance(v, dict)} if isinstance(protocol, dict) else {}
    seed = overrides.get(SEED_KEY)
    if seed is None and _select(cfg, SEED_KEY) is not None:
        seed = str(_select(cfg, SEED_KEY))
    return Job(
        name=path.name,
        path=path,
        overrides=overrides,
        status=_job_status(final),
        series=series,
        protocol=protocol,
        seed=seed,
        eval_seed=_eval_setting(protocol, cfg, "eval_seed", "callbacks.sample_metrics.seed"),
        eval_n=_eval_setting(protocol, cfg, "n_samples", "callbacks.sample_metrics.n_samples"),
        config=_plain(cfg),
    )


def _plain(cfg) -> dict | None:
    """The job config as plain data (each key resolved on its own: one dangling reference hides only itself)."""
    if cfg is None:
        return None
    return {str(k): _select(cfg, str(k)) for k in cfg.keys()}


# ---------------------------------------------------------------------------------------------------------- the sweep

OPTUNA_RESULTS = "optimization_results.yaml"


def _job_dirs(path: Path) -> list[Path]:
    """Sub-directories holding a Hydra job (``.hydra/overrides.yaml``), numbered ones first in numeric order."""
    dirs = [p for p in path.iterdir() if p.is_dir() and (p / OVERRIDES_PATH).is_file()]
    return sorted(dirs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def _sweeper_name(target: Any) -> str:
    """A short name for the sweeper plugin: ``basic``, ``optuna``, or its class path."""
    target = str(target or "")
    if not target or target.endswith("BasicSweeper"):
        return "basic"
    if "optuna" in target.lower():
        return "optuna"
    return target


def _sweep_overrides(multirun) -> list[str]:
    """The overrides the sweeper expanded: ``hydra.sweeper.params`` (config) first, then the command line."""
    params = _select(multirun, "hydra.sweeper.params") or {}
    lines = [f"{k}={v}" for k, v in params.items()] if isinstance(params, dict) else []
    task = _select(multirun, "hydra.overrides.task", resolve=False) or []  # as typed: `s${seed}` is per job
    return lines + [str(x) for x in task]


def check_is_sweep(path: Path) -> None:
    """Raise a one-line error unless ``path`` is a Hydra multirun directory."""
    if not path.exists():
        raise DataNotFoundError(f"{path} does not exist; {HOW_TO_SWEEP}")
    if not path.is_dir():
        raise DataNotFoundError(f"{path} is not a directory; {HOW_TO_SWEEP}")
    if (path / "multirun.yaml").is_file() or _job_dirs(path):
        return
    hint = ""
    if (path / OVERRIDES_PATH).is_file():
        hint = f" ({path} is one job of a sweep or a single run: give its parent directory)"
    raise DataNotFoundError(
        f"{path} is not a Hydra multirun directory: no multirun.yaml and no "
        f"<n>/.hydra/overrides.yaml{hint}; {HOW_TO_SWEEP}"
    )


def read_sweep(path: str | Path) -> Sweep:
    """Read a multirun directory: its jobs, swept keys and expected grid (basic sweeper only)."""
    path = Path(path)
    check_is_sweep(path)
    warnings: list[str] = []
    multirun = _read_yaml(path / "multirun.yaml", warnings)
    jobs = [read_job(d, warnings) for d in _job_dirs(path)]
    sweeper = _sweeper_name(_select(multirun, "hydra.sweeper._target_")) if multirun is not None else "unknown"
    if multirun is None and (path / OPTUNA_RESULTS).is_file():
        sweeper = "optuna"  # the Optuna sweeper writes its result file, not multirun.yaml
    sweep = Sweep(path=path, jobs=jobs, swept_keys=[], sweeper=sweeper, warnings=warnings)
    axes: dict[str, list[str] | None] = {}
    if multirun is not None and sweeper != "optuna":
        axes, sweep.grid_note = sweep_axes(_sweep_overrides(multirun))
    if axes:
        sweep.swept_keys = list(axes)
        sweep.sweep_values = {k: v for k, v in axes.items() if v is not None}
        if sweeper == "basic" and all(v is not None for v in axes.values()):
            sweep.grid = grid_points(axes)  # type: ignore[arg-type]
    else:
        sweep.swept_keys = differing_keys(jobs)
    if sweeper == "optuna":
        sweep.grid_note = "Optuna sweep: no grid; every job found is reported"
    if multirun is None and sweeper != "optuna":
        sweep.grid_note = "no multirun.yaml: swept keys taken from the values that differ between jobs"
    return sweep
