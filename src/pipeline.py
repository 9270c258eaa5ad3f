"""Compose-once, instantiate-everything training pipeline shared by ``train.py`` and the tests."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers), skipping nulls."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def fill_from_datamodule(cfg: DictConfig, datamodule: L.LightningDataModule) -> None:
    """Copy what the data defines (shape, classes, prompts) into the model config, so it is set in one place and
    saved with every checkpoint."""
    with open_dict(cfg):
        model = cfg.model
        if "sample_shape" in model.keys():
            model.sample_shape = list(datamodule.sample_shape)
        if "class_names" in model and model.class_names is None:
            model.class_names = getattr(datamodule, "class_names", None)
        if "prompts" in model and model.prompts is None:
            model.prompts = getattr(datamodule, "prompts", None)
        cond = cfg.get("conditioning")
        if cond is not None and "num_classes" in cond.keys() and OmegaConf.is_missing(cond, "num_classes"):
            if getattr(datamodule, "num_classes", None) is None:
                raise ValueError(f"conditioning={cond._target_.rsplit('.', 1)[-1]} needs class labels but datamodule "
                                 f"{type(datamodule).__name__} has none; use conditioning=none or a labelled dataset")
            cond.num_classes = datamodule.num_classes


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """``last`` means <run>/checkpoints/last.ckpt; a path must exist."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        path = Path(output_dir) / "checkpoints" / "last.ckpt"
    else:
        path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint at {path}")
    return str(path)


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate datamodule, model, callbacks, loggers and trainer from a composed config."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.datamodule)
    fill_from_datamodule(cfg, datamodule)
    model = instantiate(cfg.model)
    if hasattr(model, "run_config"):
        model.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = instantiate_dict(cfg.get("callbacks"))
    loggers = instantiate_dict(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return {"datamodule": datamodule, "model": model, "callbacks": callbacks, "loggers": loggers, "trainer": trainer}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything and fit; returns the built objects plus the final logged metrics."""
    objs = build(cfg)
    for logger in objs["loggers"]:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    n_params = sum(p.numel() for p in objs["model"].parameters() if p.requires_grad)
    log.info("trainable parameters: %.2fM; output dir: %s", n_params / 1e6, cfg.paths.output_dir)
    ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    objs["trainer"].fit(objs["model"], datamodule=objs["datamodule"], ckpt_path=ckpt)
    objs["metrics"] = {k: float(v) for k, v in objs["trainer"].callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    return objs
