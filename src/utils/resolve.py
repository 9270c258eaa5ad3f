"""A composed config as the job will see it, for checks that run before the job: ``${hydra:...}`` resolvable
(``hydra_runtime``) and the tree as plain values with what cannot be known yet marked (``plain``)."""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

MISSING = object()  # a ``???`` value
UNRESOLVED = object()  # an interpolation that cannot be resolved before the job runs


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
