"""Summarize a sweep: per-arm statistics of each metric, differences against a baseline arm, markdown/CSV/PNG output.

An *arm* is the set of jobs that share every swept value except the seed; its seeds are the replicates. Each job
contributes one value per metric (its last logged value, or the one logged at ``--step``); an arm's row is the mean
of those values with a Student-t interval, and arms are compared to the baseline seed by seed (paired t) when at
least two seeds match, else by Welch's unpaired t. A metric whose arms measured different things
(``difflab.ablation.comparable``) is shown but neither ranked nor differenced. With more than one comparison per
metric the p-values are Holm-adjusted; each comparison states the smallest difference it could detect (80% power)
and the seeds that would detect the observed (or ``--detect``) difference, and ends in a one-sentence verdict.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from difflab.ablation.comparable import incomparable_reason, protocol_entry
from difflab.ablation.stats import (
    ALPHA,
    POWER,
    Difference,
    Interval,
    detectable_difference,
    holm,
    mean_ci,
    paired_design,
    paired_difference,
    seeds_needed,
    welch_design,
    welch_difference,
)
from difflab.ablation.sweep import SEED_KEY, Job, Sweep, parse_job_overrides
from difflab.ops.atomic import atomic_write, write_text
from difflab.utils.errors import ConfigError, DataNotFoundError

LEVEL = 0.95
DASH = "—"
HIGHER_IS_BETTER = ("accuracy", "agreement", "clip_score", "diversity", "precision", "recall")
DEFAULT_LOSS = "val/loss"
METRIC_PREFIX = "metrics/"
AUXILIARY_SUFFIXES = ("_floor", "_std")
UNSET = "default"
SUMMARY_COLUMNS = ["arm", "metric", "n", "mean", "sd", "ci_low", "ci_high", "step_min", "step_max", "floor"]
DIFFERENCE_COLUMNS = [
    "arm",
    "baseline",
    "metric",
    "kind",
    "n",
    "mean_diff",
    "sd",
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
    "detectable_80",
    "target",
    "seeds_for_target",
    "n_arm",
    "n_baseline",
    "se",
    "df",
    "seeds",
]
MOST_SEEDS = 1000
PROTOCOL_FIELDS = ("n_samples", "feature", "weights_sha256", "resize", "reference", "eval_seed", "sampler", "guidance")
PROTOCOL_SKIP = frozenset({"floor", "floor_metric", "weights"})


@dataclass
class Arm:
    """Jobs sharing the swept values ``values`` (every swept key but the seed)."""

    label: str
    values: dict[str, str]
    jobs: list[Job]


@dataclass
class MetricRow:
    """One arm's statistics for one metric, and the jobs of the arm that had no value to contribute."""

    arm: Arm
    metric: str
    interval: Interval
    steps: list[int]
    floor: float | None
    left_out: list[Job]
    best: bool = False


@dataclass
class DifferenceRow:
    """One arm against the baseline for one metric: the estimate, or None with the reason none could be made; the
    Holm-adjusted p-value (None for a single comparison), the smallest true difference this design detects with 80%
    power, and the seeds per arm that would detect ``target`` (the observed difference, or ``--detect``)."""

    arm: Arm
    baseline: Arm
    metric: str
    result: Difference | None
    seeds: list[str] = field(default_factory=list)
    reason: str = ""
    p_adjusted: float | None = None
    detectable: float = math.nan
    target: float = math.nan
    target_text: str = ""
    needed: int | None = None


@dataclass(frozen=True)
class Detect:
    """The difference to size a sweep for (``--detect``): absolute, or a fraction of the baseline's mean."""

    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str) -> "Detect":
        """``5%`` (of the baseline's mean) or ``3.7`` (in the metric's units)."""
        raw = text.strip()
        try:
            value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(
                f"--detect {text!r}: give a positive difference, in the metric's units (3.7) or as a "
                f"percentage of the baseline's mean (5%)"
            )
        return cls(value, raw.endswith("%"))

    def absolute(self, baseline_mean: float) -> float:
        return self.value * abs(baseline_mean) if self.relative else self.value

    def describe(self, baseline_mean: float) -> str:
        size = fmt(self.absolute(baseline_mean))
        return f"{100 * self.value:.3g}% ({size})" if self.relative else size


@dataclass
class Report:
    """Everything the outputs are drawn from."""

    sweep: Sweep
    arms: list[Arm]
    metrics: list[str]
    step: int | None
    baseline: Arm
    rows: list[MetricRow]
    differences: list[DifferenceRow]
    incomparable: dict[str, str] = field(default_factory=dict)  # metric -> why its arms cannot be ranked
    detect: Detect | None = None


# ------------------------------------------------------------------------------------------------------------- arms


def arm_keys(sweep: Sweep) -> list[str]:
    """The swept keys that define arms: all of them except the seed, which indexes the replicates."""
    return [k for k in sweep.swept_keys if k != SEED_KEY]


def arm_label(values: dict[str, str]) -> str:
    """``process=edm`` (several keys joined by ``, ``); ``all jobs`` when only the seed was swept."""
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "all jobs"


def _sweep_order(sweep: Sweep, keys: list[str]) -> Callable[[dict[str, str]], tuple]:
    """Sort key putting arms in the order their values were given on the command line (unknown values last)."""

    def key(values: dict[str, str]) -> tuple:
        out = []
        for k in keys:
            listed = sweep.sweep_values.get(k) or []
            out.append(listed.index(values[k]) if values[k] in listed else len(listed))
        return tuple(out)

    return key


def group_arms(sweep: Sweep) -> list[Arm]:
    """The sweep's jobs grouped into arms, in sweep order (the order of the values on the command line)."""
    keys = arm_keys(sweep)
    groups: dict[tuple, Arm] = {}
    for job in sweep.jobs:
        values = {k: job.overrides.get(k, UNSET) for k in keys}
        groups.setdefault(tuple(values.values()), Arm(arm_label(values), values, [])).jobs.append(job)
    order = _sweep_order(sweep, keys)
    first_seen = {id(arm): i for i, arm in enumerate(groups.values())}
    return sorted(groups.values(), key=lambda a: (order(a.values), first_seen[id(a)]))


def _split_label(text: str) -> list[str]:
    """``a = 1, b=[2,3]`` -> ``["a=1", "b=[2,3]"]``: split only at commas that start a new ``key=``."""
    parts = re.split(r",\s*(?=[\w.+~/@-]+\s*=)", text)
    return [re.sub(r"\s*=\s*", "=", p.strip(), count=1) for p in parts if p.strip()]


def find_arm(arms: list[Arm], text: str) -> Arm:
    """The arm ``--baseline`` names, by its label or by the same ``key=value`` pairs in any order and spacing."""

    for arm in arms:
        if arm.label == text.strip():
            return arm
    wanted = parse_job_overrides(_split_label(text))
    for arm in arms:
        if arm.values == wanted:
            return arm
    listed = "; ".join(f"'{a.label}'" for a in arms)
    raise ConfigError(f"--baseline '{text}' is not an arm of this sweep; arms: {listed}")


# ---------------------------------------------------------------------------------------------------------- metrics


def is_auxiliary(metric: str) -> bool:
    """Floors and spreads logged next to a metric (``*_floor``, ``*_std``): shown with it, not as metrics."""
    return metric.endswith(AUXILIARY_SUFFIXES)


def logged_metrics(jobs: Iterable[Job]) -> list[str]:
    """Every metric some job logged at least once, sorted."""
    return sorted({m for job in jobs for m, s in job.series.items() if s})


def default_metrics(logged: list[str]) -> list[str]:
    """``val/loss`` and every ``metrics/*`` column except floors and spreads; all logged metrics if none of those."""
    chosen = [m for m in logged if m.startswith(METRIC_PREFIX) and not is_auxiliary(m)]
    if DEFAULT_LOSS in logged:
        chosen.insert(0, DEFAULT_LOSS)
    return chosen or [m for m in logged if not is_auxiliary(m)] or logged


def select_metrics(sweep: Sweep, requested: list[str] | None) -> list[str]:
    """The metrics to summarize: ``requested`` (each must have been logged) or the defaults."""
    logged = logged_metrics(sweep.jobs)
    if not logged:
        raise DataNotFoundError(_nothing_logged(sweep))
    if not requested:
        return default_metrics(logged)
    unknown = [m for m in requested if m not in logged]
    if unknown:
        raise ConfigError(f"--metrics: no job logged {', '.join(unknown)}; logged metrics: {', '.join(logged)}")
    return list(dict.fromkeys(requested))


def _nothing_logged(sweep: Sweep) -> str:
    """The error message for a sweep without a single logged value."""
    if not sweep.jobs:
        return f"no job in {sweep.path} has started yet (no <n>/.hydra/overrides.yaml): nothing to summarize"
    return (
        f"no job in {sweep.path} logged any metric ({len(sweep.jobs)} job directories, none with rows in "
        f"csv/metrics.csv or metrics in final_metrics.json; train with logger=csv)"
    )


def higher_is_better(metric: str) -> bool:
    """Whether larger values of ``metric`` are better (accuracy, agreement, CLIP score, diversity); else lower."""
    return any(word in metric for word in HIGHER_IS_BETTER)


def job_value(job: Job, metric: str, step: int | None) -> tuple[int, float] | None:
    """``(step, value)`` of a job for a metric: the last logged, or the one logged exactly at ``step``."""
    series = job.series.get(metric) or []
    if step is None:
        return series[-1] if series else None
    return next(((s, v) for s, v in series if s == step), None)


def job_floor(job: Job, metric: str, step: int | None) -> float | None:
    """The real-vs-real floor of a job's metric: the protocol's ``floor``, else its logged floor column."""
    entry = job.protocol.get(metric) or {}
    floor = entry.get("floor")
    if isinstance(floor, (int, float)) and math.isfinite(floor):
        return float(floor)
    for column in (entry.get("floor_metric"), f"{metric}_floor"):
        found = job_value(job, column, step) if column else None
        if found is None and column and step is not None:
            found = job_value(job, column, None)
        if found is not None:
            return found[1]
    return None


def check_step(sweep: Sweep, metrics: list[str], step: int | None) -> None:
    """Fail when ``--step`` matches no logged value of any chosen metric (a typo, or a step never evaluated)."""
    if step is None:
        return
    if any(job_value(j, m, step) for j in sweep.jobs for m in metrics):
        return
    steps = sorted({s for j in sweep.jobs for m in metrics for s, _ in j.series.get(m, [])})
    raise ConfigError(
        f"--step {step}: no job logged {', '.join(metrics)} at that step; steps logged: "
        f"{_shorten([str(s) for s in steps])}"
    )


def _shorten(items: list[str], limit: int = 12) -> str:
    """A comma list, elided in the middle when long."""
    shown = items if len(items) <= limit else [*items[:6], "...", *items[-5:]]
    return ", ".join(shown) or "none"


# ---------------------------------------------------------------------------------------------------------- analysis


def metric_row(arm: Arm, metric: str, step: int | None) -> MetricRow:
    """One arm's statistics for one metric."""
    found = [(job, job_value(job, metric, step)) for job in arm.jobs]
    used = [(job, sv) for job, sv in found if sv is not None]
    floors = [f for f in (job_floor(job, metric, step) for job, _ in used) if f is not None]
    if not used:  # no value, but the jobs may still have measured the floor
        floors = [f for f in (job_floor(job, metric, step) for job in arm.jobs) if f is not None]
    return MetricRow(
        arm=arm,
        metric=metric,
        interval=mean_ci([v for _, (_, v) in used], LEVEL),
        steps=sorted({s for _, (s, _) in used}),
        floor=float(np.mean(floors)) if floors else None,
        left_out=[job for job, sv in found if sv is None],
    )


def mark_best(rows: list[MetricRow]) -> None:
    """Flag the arm(s) with the best mean (direction by metric name) when at least two arms have a value; arms tied
    for best are all flagged, and none when every arm ties."""
    scored = [r for r in rows if r.interval.n > 0]
    if len(scored) < 2:
        return
    pick = max if higher_is_better(rows[0].metric) else min
    best = pick(r.interval.mean for r in scored)
    tied = [r for r in scored if r.interval.mean == best]
    if len(tied) < len(scored):
        for r in tied:
            r.best = True


def seed_values(arm: Arm, metric: str, step: int | None) -> dict[str, float]:
    """Per training seed, the arm's value; seeds that occur in more than one job of the arm cannot be paired."""
    counts: dict[str, int] = {}
    values: dict[str, float] = {}
    for job in arm.jobs:
        found = job_value(job, metric, step)
        if found is None or job.seed is None:
            continue
        counts[job.seed] = counts.get(job.seed, 0) + 1
        values[job.seed] = found[1]
    return {s: v for s, v in values.items() if counts[s] == 1}


def _seed_sort(seed: str) -> tuple:
    """Numeric seeds in numeric order, others after them."""
    try:
        return (0, float(seed), seed)
    except ValueError:
        return (1, 0.0, seed)


def compare(arm: Arm, baseline: Arm, metric: str, step: int | None, detect: Detect | None = None) -> DifferenceRow:
    """``arm − baseline`` for one metric: paired over matching seeds when ≥ 2 match, else Welch when both arms have
    ≥ 2 values, else no estimate; with the design's detectable difference and the seeds that would detect the
    target difference (``detect``, else the observed one), both at 80% power and alpha 0.05."""
    a, b = seed_values(arm, metric, step), seed_values(baseline, metric, step)
    matched = sorted(set(a) & set(b), key=_seed_sort)
    all_a = [sv[1] for sv in (job_value(j, metric, step) for j in arm.jobs) if sv is not None]
    all_b = [sv[1] for sv in (job_value(j, metric, step) for j in baseline.jobs) if sv is not None]
    if len(matched) >= 2:
        result = paired_difference([a[s] for s in matched], [b[s] for s in matched], LEVEL)
        row = DifferenceRow(arm, baseline, metric, result, seeds=matched)
        design = lambda n: paired_design(result.sd, n)  # noqa: E731
    elif len(all_a) >= 2 and len(all_b) >= 2:
        result = welch_difference(all_a, all_b, LEVEL)
        row = DifferenceRow(arm, baseline, metric, result, reason=f"{len(matched)} matched seed(s)")
        var_a, var_b = float(np.var(all_a, ddof=1)), float(np.var(all_b, ddof=1))
        design = lambda n: welch_design(var_a, var_b, n, n)  # noqa: E731
    else:
        return DifferenceRow(
            arm,
            baseline,
            metric,
            None,
            reason=f"{len(matched)} matched seed(s) and {len(all_a)} vs {len(all_b)} values: too few to estimate",
        )
    row.detectable = detectable_difference(result.se, result.df)
    row.target = detect.absolute(float(np.mean(all_b))) if detect else abs(result.mean)
    row.target_text = detect.describe(float(np.mean(all_b))) if detect else fmt(row.target)
    row.needed = seeds_needed(row.target, design, most=MOST_SEEDS)
    return row


def adjust(rows: list[DifferenceRow]) -> None:
    """Holm-adjust the p-values of one metric's comparisons against the baseline when there is more than one."""
    scored = [r for r in rows if r.result is not None and not math.isnan(r.result.p_value)]
    if len(scored) < 2:
        return
    for row, p in zip(scored, holm([r.result.p_value for r in scored])):
        row.p_adjusted = p


def build_report(
    sweep: Sweep,
    metrics: list[str] | None = None,
    baseline: str | None = None,
    step: int | None = None,
    detect: Detect | None = None,
) -> Report:
    """All statistics of a sweep: rows per metric × arm and, for metrics the arms measured alike, the best arm and
    the differences against the baseline arm (Holm-adjusted, with their power)."""
    chosen = select_metrics(sweep, metrics)
    check_step(sweep, chosen, step)
    arms = group_arms(sweep)
    base = find_arm(arms, baseline) if baseline else arms[0]
    rows: list[MetricRow] = []
    differences: list[DifferenceRow] = []
    incomparable: dict[str, str] = {}
    for metric in chosen:
        metric_rows = [metric_row(arm, metric, step) for arm in arms]
        rows.extend(metric_rows)
        reason = incomparable_reason(metric, arms, sweep.swept_keys)
        if reason is not None:
            incomparable[metric] = reason
            continue
        mark_best(metric_rows)
        compared = [compare(arm, base, metric, step, detect) for arm in arms if arm is not base]
        adjust(compared)
        differences.extend(compared)
    return Report(
        sweep=sweep,
        arms=arms,
        metrics=chosen,
        step=step,
        baseline=base,
        rows=rows,
        differences=differences,
        incomparable=incomparable,
        detect=detect,
    )


# ------------------------------------------------------------------------------------------------------------ text


def fmt(value: Any, digits: int = 4) -> str:
    """A number for the tables: ``digits`` significant digits, ``—`` for missing/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}g}"


def fmt_p(p: float) -> str:
    """A p-value with 2 significant digits, ``<1e-4`` below that."""
    if p is None or math.isnan(p):
        return DASH
    return "<1e-4" if p < 1e-4 else f"{p:.2g}"


def fmt_interval(low: float, high: float) -> str:
    """``[low, high]`` or ``—``."""
    if math.isnan(low) or math.isnan(high):
        return DASH
    return f"[{fmt(low)}, {fmt(high)}]"


def fmt_steps(steps: list[int]) -> str:
    """The step a value comes from, or the range ``min–max`` when jobs differ."""
    if not steps:
        return DASH
    return str(steps[0]) if steps[0] == steps[-1] else f"{steps[0]}–{steps[-1]}"


def describe_job(job: Job, keys: list[str]) -> str:
    """``job 3 (process=edm, seed=0)``."""
    values = ", ".join(f"{k}={job.overrides.get(k, UNSET)}" for k in keys)
    return f"job {job.name}" + (f" ({values})" if values else "")


def _grid_line(sweep: Sweep) -> str:
    """``swept keys: process (vp, edm), seed (0, 1, 2)``."""
    parts = []
    for key in sweep.swept_keys:
        listed = sweep.sweep_values.get(key)
        parts.append(f"`{key}`" + (f" ({', '.join(listed)})" if listed else ""))
    return ", ".join(parts) or "none"


def job_count_lines(sweep: Sweep) -> list[str]:
    """Found / finished / unfinished / missing, naming the missing grid points and the unfinished jobs."""
    jobs, keys = sweep.jobs, sweep.swept_keys
    finished = [j for j in jobs if j.finished]
    statuses: dict[str, int] = {}
    for job in finished:
        statuses[job.status] = statuses.get(job.status, 0) + 1
    missing = sweep.missing_points()
    unfinished = [j for j in jobs if not j.finished]
    expected = f"{len(sweep.grid)} in the grid, " if sweep.grid is not None else ""
    how = ", ".join(f"{n} {s}" for s, n in statuses.items())
    lines = [
        f"- jobs: {expected}{len(jobs)} found, {len(finished)} finished"
        + (f" ({how})" if how else "")
        + f", {len(unfinished)} unfinished"
        + (f", {len(missing)} missing" if sweep.grid is not None else "")
    ]
    if missing:
        named = "; ".join(f"job {i} ({', '.join(f'{k}={v}' for k, v in p.items())})" for i, p in missing)
        lines.append(f"- missing (no job directory): {named}")
    if unfinished:
        named = "; ".join(
            describe_job(j, keys)
            + (f", last logged step {j.last_step}" if j.last_step is not None else ", nothing logged")
            for j in unfinished
        )
        lines.append(f"- unfinished (no final_metrics.json: still running or failed): {named}")
    return lines


def _hashable(value: Any) -> Any:
    """Scalars as they are, anything else (a list from a config) as its text, so settings can be compared."""
    return value if value is None or isinstance(value, (int, float, str, bool)) else str(value)


def _evaluation_setting(job: Job, metric: str | None) -> tuple:
    """(eval seed, sample count) a job evaluated ``metric`` with: its protocol entry, else the job's own record."""
    entry = protocol_entry(job, metric) if metric else None
    if entry is not None and entry.get("eval_seed") is not None:
        return _hashable(entry.get("eval_seed")), _hashable(entry.get("n_samples"))
    return _hashable(job.eval_seed), _hashable(job.eval_n)


def evaluation_line(jobs: list[Job], metric: str | None = None) -> str:
    """Whether differences are paired by evaluation noise: every job evaluated ``metric`` (or its sample metrics)
    with the same eval seed and count."""
    settings = {_evaluation_setting(j, metric) for j in jobs}
    settings.discard((None, None))
    if not settings or any(s is None for s, _ in settings):
        return (
            "no evaluation seed recorded (no protocol eval_seed, no callbacks.sample_metrics.seed): cannot tell "
            "whether arms were evaluated on the same noise"
        )
    if len(settings) == 1 and "mixed" not in next(iter(settings)):
        seed, n = next(iter(settings))
        count = f", n {n}" if n is not None else ""
        return f"paired: every arm was evaluated on the same noise (eval seed {seed}{count})"
    shown = "; ".join(
        f"seed {s}, n {n}: jobs " + ", ".join(j.name for j in jobs if _evaluation_setting(j, metric) == (s, n))
        for s, n in sorted(settings, key=str)
    )
    return f"evaluation seeds differ between jobs ({shown}): differences are not paired by evaluation noise"


def _show_value(value: Any) -> str:
    """A protocol value in words: dicts as ``key value`` lists."""
    if isinstance(value, dict):
        return " ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def protocol_line(metric: str, jobs: list[Job]) -> str | None:
    """How a metric was measured (one line), naming the jobs when they measured it differently; None if unknown."""
    entries = [(j, j.protocol[metric]) for j in jobs if metric in j.protocol]
    if not entries:
        return None
    keys = [k for k in PROTOCOL_FIELDS if any(k in e for _, e in entries)]
    keys += sorted({k for _, e in entries for k in e} - set(keys) - PROTOCOL_SKIP)
    parts = []
    for key in keys:
        shown: dict[str, list[str]] = {}
        for job, entry in entries:
            shown.setdefault(_show_value(entry.get(key, DASH)), []).append(job.name)
        if len(shown) == 1:
            parts.append(f"{key.replace('_', ' ')} {next(iter(shown))}")
        else:
            parts.append(
                f"{key.replace('_', ' ')} DIFFERS: "
                + " / ".join(f"{v} (jobs {', '.join(names)})" for v, names in shown.items())
            )
    floors = [e["floor"] for _, e in entries if isinstance(e.get("floor"), (int, float))]
    if floors:
        parts.append(f"real-vs-real floor {fmt(float(np.mean(floors)))}")
    line = f"- `{metric}`: " + ", ".join(parts)
    lacking = [j.name for j in jobs if metric not in j.protocol and j.series.get(metric)]
    if lacking:
        line += f" (no protocol recorded by jobs {', '.join(lacking)})"
    return line


def header_lines(report: Report) -> list[str]:
    """The summary's header: what was read, what is missing, how values were chosen and evaluated."""
    sweep = report.sweep
    keys = arm_keys(sweep)
    lines = [
        f"# Ablation summary: {sweep.path.name}",
        "",
        f"- sweep: `{sweep.path}`",
        f"- sweeper: {sweep.sweeper}; swept keys: {_grid_line(sweep)}",
    ]
    if sweep.grid_note:
        lines.append(f"- note: {sweep.grid_note}")
    by = ", ".join(f"`{k}`" for k in keys) or "nothing (only the seed varies)"
    lines.append(f"- arms: {len(report.arms)}, by {by}; replicates: `{SEED_KEY}`")
    lines += job_count_lines(sweep)
    lines.append(
        "- values: "
        + (
            "each job's last logged value"
            if report.step is None
            else f"the value each job logged at step {report.step}"
        )
    )
    lines.append(f"- intervals: {LEVEL:.0%} Student-t over an arm's seeds (mean ± t·sd/√n); n = 1 gives no sd or CI")
    detect = report.detect
    target = (
        "the observed difference (`--detect 5%` sizes the sweep for another)"
        if detect is None
        else f"{100 * detect.value:.3g}% of the baseline's mean"
        if detect.relative
        else f"a difference of {fmt(detect.value)}"
    )
    lines.append(
        f"- power: each comparison states the smallest difference it detects with {POWER:.0%} power at "
        f"alpha {ALPHA}, and the seeds per arm that would detect {target}"
    )
    for reason in report.incomparable.values():
        lines.append(f"- not compared: {reason}; its values are shown per arm, not ranked or differenced")
    protocol = [p for p in (protocol_line(m, sweep.jobs) for m in report.metrics) if p]
    if protocol:
        lines += ["", "## Metric protocol", "", *protocol]
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table."""
    cells = [header, ["---"] * len(header), *rows]
    return ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]


def metric_table(report: Report, metric: str) -> list[str]:
    """One metric's table (one row per arm), with notes on the jobs that had no value."""
    rows = [r for r in report.rows if r.metric == metric]
    direction = "higher is better" if higher_is_better(metric) else "lower is better"
    with_floor = any(r.floor is not None for r in rows)
    ranked = metric not in report.incomparable
    header = (
        ["arm", "n", "mean", "sd", f"{LEVEL:.0%} CI", "step"]
        + (["floor"] if with_floor else [])
        + (["best"] if ranked else [])
    )
    body = []
    for r in rows:
        iv = r.interval
        cells = [r.arm.label, str(iv.n), fmt(iv.mean), fmt(iv.sd), fmt_interval(iv.low, iv.high), fmt_steps(r.steps)]
        cells += [fmt(r.floor)] if with_floor else []
        body.append(cells + (["**best**" if r.best else ""] if ranked else []))
    if ranked:
        lines = [
            "",
            f"### `{metric}` ({direction})",
            "",
            f"evaluation: {evaluation_line(report.sweep.jobs, metric)}",
            "",
            *_table(header, body),
        ]
    else:
        lines = [
            "",
            f"### `{metric}` (not compared)",
            "",
            f"> **not comparable across arms:** {report.incomparable[metric]}; the values below are each arm's "
            f"own, not ranked or differenced.",
            "",
            *_table(header, body),
        ]
    steps = sorted({s for r in rows for s in r.steps})
    if report.step is None and len(steps) > 1:
        lines.append(
            f"\nnote: the values come from different steps ({fmt_steps(steps)}); "
            f"`--step N` compares every job at one step"
        )
    where = "no value logged" if report.step is None else f"no value at step {report.step}"
    keys = report.sweep.swept_keys
    for r in rows:
        if r.left_out:
            named = "; ".join(
                describe_job(j, keys)
                + (f" (last logged step {j.series[metric][-1][0]})" if j.series.get(metric) else "")
                for j in r.left_out
            )
            lines.append(f"\nleft out of `{r.arm.label}` ({where}): {named}")
    return lines


def _seeds_text(needed: int | None) -> str:
    return str(needed) if needed is not None else f"> {MOST_SEEDS}"


def difference_table(report: Report, metric: str) -> list[str]:
    """One metric's differences against the baseline (one row per other arm), with the Holm-adjusted p-value when
    there is more than one comparison, the detectable difference and the seeds for the target difference."""
    rows = [d for d in report.differences if d.metric == metric]
    adjusted = any(d.p_adjusted is not None for d in rows)
    header = (
        ["arm", "kind", "n", "mean diff", "sd", f"{LEVEL:.0%} CI", "p"]
        + (["p (Holm)"] if adjusted else [])
        + [f"detectable ({POWER:.0%})", "target", "seeds for target", "seeds"]
    )
    body = []
    for d in rows:
        r = d.result
        if r is None:
            body.append([d.arm.label] + [DASH] * (len(header) - 2) + [d.reason])
            continue
        kind = "paired t" if r.kind == "paired" else "unpaired (Welch)"
        n = str(r.n) if r.kind == "paired" else f"{r.n_a} vs {r.n_b}"
        seeds = ", ".join(d.seeds) if d.seeds else d.reason
        body.append(
            [d.arm.label, kind, n, fmt(r.mean), fmt(r.sd), fmt_interval(r.low, r.high), fmt_p(r.p_value)]
            + ([fmt_p(d.p_adjusted) if d.p_adjusted is not None else DASH] if adjusted else [])
            + [fmt(d.detectable), fmt(d.target), _seeds_text(d.needed) if d.target else DASH, seeds]
        )
    return ["", f"### `{metric}`", "", *_table(header, body)] if body else []


def verdict(d: DifferenceRow, comparisons: int) -> str:
    """One sentence a reviewer would accept: the arm's difference from the baseline with its interval, p-value
    (Holm-adjusted when several comparisons), whether the sweep resolves it, and what more seeds would do."""
    r = d.result
    name, base = f"`{d.arm.label}`", f"`{d.baseline.label}`"
    seeds = f"{r.n} seeds" if r.kind == "paired" else f"{r.n_a} and {r.n_b} seeds"
    if r.mean == 0 and (r.sd == 0 or math.isnan(r.p_value)):
        return f"{name} gives the same `{d.metric}` as {base} in every seed (difference 0 over {seeds})."
    lower = r.mean < 0
    low, high = (-r.high, -r.low) if lower else (r.low, r.high)
    better = lower != higher_is_better(d.metric)
    p = d.p_adjusted if d.p_adjusted is not None else r.p_value
    p_text = f"p = {fmt_p(p)}" + (
        f" (Holm-adjusted over {comparisons} comparisons; unadjusted {fmt_p(r.p_value)})"
        if d.p_adjusted is not None
        else ""
    )
    text = (
        f"{name} is {'lower' if lower else 'higher'} in `{d.metric}` than {base} by {fmt(abs(r.mean))} "
        f"[{fmt(low)}, {fmt(high)}] ({'better' if better else 'worse'}), {p_text}, "
    )
    if p < ALPHA:
        return text + f"resolved with {seeds}."
    text += f"not resolved with {seeds}"
    if math.isfinite(d.detectable) and abs(r.mean) < d.detectable:
        text += f"; it is below the smallest difference this sweep detects with {POWER:.0%} power ({fmt(d.detectable)})"
    if d.needed is not None:
        text += f"; {d.needed} seeds would detect a {d.target_text} difference at {POWER:.0%} power"
    else:
        text += (
            f"; more than {MOST_SEEDS} seeds would be needed to detect a {d.target_text} difference at "
            f"{POWER:.0%} power"
        )
    return text + "."


def verdict_lines(report: Report) -> list[str]:
    """The verdict of every comparison, per metric."""
    lines = []
    for metric in report.metrics:
        rows = [d for d in report.differences if d.metric == metric and d.result is not None]
        lines += [f"- {verdict(d, len(rows))}" for d in rows]
    return lines


def render_markdown(report: Report) -> str:
    """summary.md: header, one table per metric, then the differences against the baseline."""
    lines = header_lines(report)
    lines += ["", f"## Results ({LEVEL:.0%} Student-t intervals over seeds)"]
    for metric in report.metrics:
        lines += metric_table(report, metric)
    diff_lines = [line for m in report.metrics for line in difference_table(report, m)]
    if diff_lines:
        lines += [
            "",
            f"## Differences against `{report.baseline.label}` (arm − baseline)",
            "",
            f"Paired by training seed where ≥ 2 seeds match (paired t), else unpaired (Welch) when both arms "
            f"have ≥ 2 values. With more than one comparison per metric, p (Holm) controls the chance of any "
            f"false difference among them at {ALPHA}; the intervals are not adjusted. `detectable`: the "
            f"smallest true difference this design detects with {POWER:.0%} power at alpha {ALPHA}; `seeds for "
            f"target`: seeds per arm that would detect the target difference.",
            *diff_lines,
            "",
            "## Verdicts",
            "",
            *verdict_lines(report),
        ]
    if report.sweep.warnings:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in report.sweep.warnings)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------- CSV


def _num(value: Any) -> Any:
    """A CSV cell: full-precision number, empty for missing/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def summary_records(report: Report) -> list[dict[str, Any]]:
    """summary.csv rows: one per arm × metric."""
    return [
        {
            "arm": r.arm.label,
            "metric": r.metric,
            "n": r.interval.n,
            "mean": _num(r.interval.mean),
            "sd": _num(r.interval.sd),
            "ci_low": _num(r.interval.low),
            "ci_high": _num(r.interval.high),
            "step_min": r.steps[0] if r.steps else "",
            "step_max": r.steps[-1] if r.steps else "",
            "floor": _num(r.floor),
        }
        for r in report.rows
    ]


def difference_records(report: Report) -> list[dict[str, Any]]:
    """differences.csv rows: one per (non-baseline arm, metric) that has an estimate."""
    out = []
    for d in report.differences:
        r = d.result
        if r is None:
            continue
        out.append(
            {
                "arm": d.arm.label,
                "baseline": d.baseline.label,
                "metric": d.metric,
                "kind": r.kind,
                "n": r.n,
                "mean_diff": _num(r.mean),
                "sd": _num(r.sd),
                "ci_low": _num(r.low),
                "ci_high": _num(r.high),
                "p_value": _num(r.p_value),
                "p_holm": _num(d.p_adjusted),
                "detectable_80": _num(d.detectable),
                "target": _num(d.target),
                "seeds_for_target": d.needed if d.needed is not None else "",
                "n_arm": r.n_a,
                "n_baseline": r.n_b,
                "se": _num(r.se),
                "df": _num(r.df),
                "seeds": " ".join(d.seeds),
            }
        )
    return out


def csv_text(columns: list[str], records: list[dict[str, Any]]) -> str:
    """CSV text with a header line."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------------ plots


def plot_file_name(metric: str) -> str:
    """``metrics/fd_digit200`` -> ``metrics_fd_digit200.png``."""
    return metric.replace("/", "_").replace("\\", "_") + ".png"


def arm_curve(arm: Arm, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Steps, mean, band low/high (NaN where < 2 jobs have the step) of an arm's metric over training, and how
    many of its jobs logged the metric at all."""
    by_step: dict[int, list[float]] = {}
    jobs = 0
    for job in arm.jobs:
        series = job.series.get(metric) or []
        jobs += bool(series)
        for step, value in series:
            by_step.setdefault(step, []).append(value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    stats = [mean_ci(by_step[s], LEVEL) for s in steps]
    return (
        steps,
        np.array([c.mean for c in stats]),
        np.array([c.low for c in stats]),
        np.array([c.high for c in stats]),
        jobs,
    )


def draw_metric(report: Report, metric: str):
    """A matplotlib Figure (Agg canvas, no pyplot state) of one metric against step, one line + band per arm."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for arm in report.arms:
        steps, mean, low, high, n = arm_curve(arm, metric)
        if n == 0:
            continue
        (line,) = ax.plot(steps, mean, marker="o" if len(steps) < 12 else None, ms=3, label=f"{arm.label} (n={n})")
        band = np.isfinite(low) & np.isfinite(high)
        if band.any():
            ax.fill_between(
                steps,
                np.where(band, low, np.nan),
                np.where(band, high, np.nan),
                where=band,
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
    floors = [r.floor for r in report.rows if r.metric == metric and r.floor is not None]
    if floors:
        ax.axhline(float(np.mean(floors)), color="gray", linestyle="--", linewidth=1, label="real-vs-real floor")
    if report.step is not None:
        ax.axvline(report.step, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title=f"mean, {LEVEL:.0%} t band")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------- output


def write_report(report: Report, out_dir: str | Path, markdown: str | None = None) -> list[Path]:
    """Write summary.md, summary.csv, differences.csv and one PNG per metric into ``out_dir``; returns the paths.

    Only these files are (re)written: anything else in ``out_dir`` is left alone.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.md", out / "summary.csv", out / "differences.csv"]
    write_text(written[0], markdown if markdown is not None else render_markdown(report))
    write_text(written[1], csv_text(SUMMARY_COLUMNS, summary_records(report)))
    write_text(written[2], csv_text(DIFFERENCE_COLUMNS, difference_records(report)))
    for metric in report.metrics:
        fig = draw_metric(report, metric)
        path = out / plot_file_name(metric)
        atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png"))
        written.append(path)
    return written
