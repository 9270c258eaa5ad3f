"""Which metrics a sweep may rank: what each logged metric depends on, and whether the arms share it.

A number ranks arms only when the arms measured the same thing the same way. Two kinds of metric are declared here:

- training losses (``train/loss``, ``val/loss``, ``val_loss_t/*``) are in the units of each arm's own objective: they
  depend on the job config's ``process`` and ``objective`` (keys that only change sampling excepted). A sweep over
  the process, the prediction target, the weighting, a training density or the loss type changes what they measure;
- sample metrics (``metrics/*``) depend on their protocol (``metrics/protocol.json``): the sample count, the judge
  (feature network, its weights, resize), the reference set, and how the samples were drawn (sampler, guidance).
  The sampler and guidance may differ when the sweep swept them (then the metric compares generation procedures).

Every other metric depends on nothing declared and is compared as logged. The evaluation seed is not a dependency
(other noise gives a valid but unpaired comparison); it decides whether differences are paired by evaluation noise.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any, Iterable

from difflab.ablation.sweep import Job
from difflab.utils.resolve import leaves

LOSS_METRICS = ("train/loss", "val/loss", "val_loss_t/*")
LOSS_CONFIG = ("process", "objective")
SAMPLING_ONLY = frozenset({"spacing", "sampling_shift", "x0_clip", "clip_range", "dynamic_quantile", "dynamic_max"})
SAMPLE_PREFIX = "metrics/"
MEASUREMENT_FIELDS = ("n_samples", "feature", "weights_sha256", "resize", "reference", "n_cols", "pairs")
GENERATION_FIELDS = ("sampler", "guidance")
GENERATION_KEYS = ("sampler", "guidance")  # swept keys whose path names one of these change how samples are drawn


def is_loss(metric: str) -> bool:
    """A training loss: measured in the units of the arm's own objective."""
    return any(fnmatch.fnmatchcase(metric, pattern) for pattern in LOSS_METRICS)


def protocol_entry(job: Job, metric: str) -> dict | None:
    """The job's protocol entry for ``metric`` (entries may name a family: ``val_loss_t/bucket_*``)."""
    if metric in job.protocol:
        return job.protocol[metric]
    return next((e for k, e in job.protocol.items() if "*" in k and fnmatch.fnmatchcase(metric, k)), None)


def _without_sampling_keys(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_sampling_keys(v) for k, v in node.items() if k not in SAMPLING_ONLY}
    if isinstance(node, list):
        return [_without_sampling_keys(v) for v in node]
    return node


def _leaves(node: Any) -> dict[str, str]:
    """``{dotted.key: value as JSON}`` of a nested config."""
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in leaves(node).items()}


def _differing(values_per_arm: dict[str, dict[str, str]]) -> list[str]:
    """The keys whose values are not the same in every arm."""
    keys = sorted({k for leaves in values_per_arm.values() for k in leaves})
    return [k for k in keys if len({leaves.get(k) for leaves in values_per_arm.values()}) > 1]


def _arms_jobs(arms) -> dict[str, list[Job]]:
    return {arm.label: [j for j in arm.jobs] for arm in arms}


def loss_reason(metric: str, arms, swept_keys: Iterable[str]) -> str | None:
    """Why a training loss cannot be compared across ``arms`` (None when it can): the arms' ``process`` /
    ``objective`` configs differ (jobs without a readable config: a swept key of those groups)."""
    per_arm: dict[str, dict[str, str]] = {}
    unknown = False
    for label, jobs in _arms_jobs(arms).items():
        leaves: dict[str, str] = {}
        for job in jobs:
            config = job.config or {}
            found = {g: config.get(g) for g in LOSS_CONFIG if isinstance(config, dict) and g in config}
            if not found:
                unknown = True
                continue
            leaves = _leaves(_without_sampling_keys(found))
            break
        per_arm[label] = leaves
    differing = _differing({k: v for k, v in per_arm.items() if v})
    if not differing and unknown:
        swept = [k for k in swept_keys if k.split(".")[0] in (*LOSS_CONFIG, "schedule", "experiment")]
        if swept:
            return (
                f"`{metric}` is a training loss in each arm's own units and the sweep changes "
                f"{', '.join(f'`{k}`' for k in swept)}, on which it depends (the job configs are unreadable)"
            )
        return None
    if not differing:
        return None
    shown = ", ".join(f"`{k}`" for k in differing[:4]) + (
        f" and {len(differing) - 4} more" if len(differing) > 4 else ""
    )
    return (
        f"`{metric}` is a training loss in each arm's own units (process and objective), and those differ "
        f"between arms ({shown})"
    )


def sample_reason(metric: str, arms, swept_keys: Iterable[str]) -> str | None:
    """Why a sample metric cannot be compared across ``arms`` (None when it can): its protocol differs in how it
    measures (count, judge, reference), or in how samples were drawn when the sweep did not sweep that."""
    generation_swept = any(word in k for k in swept_keys for word in GENERATION_KEYS)
    fields = MEASUREMENT_FIELDS + (() if generation_swept else GENERATION_FIELDS)
    per_arm: dict[str, dict[str, str]] = {}
    for arm in arms:
        entries = [e for e in (protocol_entry(j, metric) for j in arm.jobs) if e is not None]
        leaves: dict[str, str] = {}
        for entry in entries:
            for field in fields:
                if field in entry:
                    value = json.dumps(entry[field], sort_keys=True, default=str)
                    if leaves.setdefault(field, value) != value:
                        leaves[field] = "(differs within the arm)"
        per_arm[arm.label] = leaves
    differing = _differing({k: v for k, v in per_arm.items() if v})
    if not differing:
        return None
    shown = "; ".join(
        f"{field} " + " vs ".join(f"{per_arm[a.label].get(field, '?')} ({a.label})" for a in arms if per_arm[a.label])
        for field in differing[:2]
    )
    return f"`{metric}` was measured differently in different arms ({shown})"


def incomparable_reason(metric: str, arms, swept_keys: Iterable[str]) -> str | None:
    """One line saying why ``metric`` must not be ranked across ``arms``; None when it may be."""
    if len(arms) < 2:
        return None
    if is_loss(metric):
        return loss_reason(metric, arms, list(swept_keys))
    if metric.startswith(SAMPLE_PREFIX):
        return sample_reason(metric, arms, list(swept_keys))
    return None
