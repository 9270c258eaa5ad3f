"""Compose difflab's training config in this process, as ``train.py`` would, for notebooks, benchmarks and tests."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, open_dict

from difflab.configs import CONFIG_DIR


def compose_train(output_dir: str | Path, overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose ``configs/train.yaml`` in-process like ``train.py`` does, with ``paths.output_dir`` set and Hydra's
    runtime info (``${hydra:...}``) available; the returned config can go straight to ``difflab.pipeline.train``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=[*overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    return cfg
