"""A composed config as the job will see it, for checks that run before the job: ``${hydra:...}`` resolvable
(``hydra_runtime``), the tree as plain values with what cannot be known yet marked (``plain``), its keys and values
as the command line spells them (``leaves``, ``at``, ``shown``) and a value that only repeats another key
(``echoes``)."""

from __future__ import annotations

import copy
import os
import re
from contextlib import contextmanager
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

MISSING = object()  # a ``???`` value
UNRESOLVED = object()  # an interpolation that cannot be resolved before the job runs


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted.key: value}`` for every leaf of nested dicts (``prefix.`` before each key when given)."""
    if isinstance(node, dict):
        return {
            k: v
            for key, child in node.items()
            for k, v in leaves(child, f"{prefix}.{key}" if prefix else str(key)).items()
        }
    return {prefix: node}


def at(tree: Any, dotted: str) -> Any:
    """The value at ``dotted`` (``a.b.c``) of nested dicts; None where a part is missing."""
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def shown(value: Any) -> str:
    """A value as it would be typed on the command line (a string that is not printable as its repr: a value read
    from a file is shown, never interpreted by the terminal)."""
    if value is MISSING:
        return "???"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text if text.isprintable() else repr(text)


def echoes(source: Any, key: str) -> bool:
    """``source`` (a raw, unresolved config value) is nothing but ``key``'s value or a resolver of it:
    ``${key}``, ``${oc.select:key,...}``, ``${name:${key}}`` or ``${name:${key},${other},...}`` (a resolver whose first
    argument is ``key``, as ``${round_total:${method.steps_per_round},...}``), so a problem or change of ``key`` is one,
    not two."""
    if not isinstance(source, str):
        return False
    k = re.escape(key)
    others = r"(\s*,\s*\$\{[\w.]+\})*"
    return bool(re.fullmatch(rf"\$\{{((oc\.select:)?{k}(,[^}}]*)?|[\w.]+:\$\{{{k}\}}{others})\}}", source))


def plain(node: Any) -> Any:
    """``node`` as plain dicts / lists with interpolations resolved; ``???`` -> MISSING, unresolvable -> UNRESOLVED."""
    if isinstance(node, DictConfig):
        if node._is_none():
            return None
        out = {}
        for key in node.keys():
            if OmegaConf.is_missing(node, key):
                out[key] = MISSING
                continue
            try:
                out[key] = plain(node[key])
            except Exception:  # noqa: BLE001 - e.g. an interpolation to a value filled in later
                out[key] = UNRESOLVED
        return out
    if isinstance(node, ListConfig):
        if node._is_none():
            return None
        out = []
        for i in range(len(node)):
            try:
                out.append(MISSING if OmegaConf.is_missing(node, i) else plain(node[i]))
            except Exception:  # noqa: BLE001
                out.append(UNRESOLVED)
        return out
    return node


@contextmanager
def hydra_runtime(cfg: DictConfig) -> Iterator[DictConfig]:
    """Make ``${hydra:...}`` resolve as the job will see it: HydraConfig set from (a copy of) ``cfg`` with the output
    directory filled in, which Hydra itself does only after ``on_run_start``. Configs without a ``hydra`` node (the
    in-process path) use whatever HydraConfig is set."""
    if not isinstance(cfg, DictConfig) or "hydra" not in cfg:
        yield cfg
        return
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    instance = HydraConfig.instance()
    saved = instance.cfg
    cfg = copy.deepcopy(cfg)
    try:
        instance.set_config(cfg)
        runtime = cfg.hydra.runtime
        if OmegaConf.is_missing(runtime, "output_dir") or not runtime.get("output_dir"):
            key = "hydra.sweep.dir" if cfg.hydra.get("mode") == RunMode.MULTIRUN else "hydra.run.dir"
            try:
                run_dir = OmegaConf.select(cfg, key)
            except Exception:  # noqa: BLE001 - leave ${hydra:runtime.output_dir} unresolved
                run_dir = None
            if run_dir:
                with read_write(runtime), open_dict(runtime):
                    runtime.output_dir = os.path.abspath(str(run_dir))
                instance.set_config(cfg)
        yield cfg
    finally:
        instance.cfg = saved
