"""Compose-once, instantiate-everything training pipeline shared by ``train.py`` and the tests."""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict

from difflab.config_checks import ensure_valid
from difflab.metrics.protocol import write_protocol
from difflab.ops import ddp_multirun
from difflab.ops import wandb as wandb_ops
from difflab.ops.atomic import remove_stale_temporaries
from difflab.ops.finetune import init_callbacks
from difflab.ops.fsdp import fit_precision
from difflab.ops.hardware import fit_accelerator
from difflab.ops.precision import resolve_precision
from difflab.ops.resume import refuse_changed_resume, resolve_resume
from difflab.ops.run_lock import run_dir_lock
from difflab.ops.signals import GracefulShutdown, checkpoint_dir, find_shutdown
from difflab.ops.slurm import cluster_plugins
from difflab.run_bounds import stopping_bound
from difflab.trust import data_strings
from difflab.utils.errors import ConfigError, instantiate_reporting
from difflab.utils.logging import print_lightning_lines_once
from difflab.utils.run_record import write_final_metrics as write_record

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
        model = cfg.model.diffusion if "diffusion" in cfg.model else cfg.model  # kl_vae: the module's own keys
        if "sample_shape" in model.keys():
            model.sample_shape = list(datamodule.sample_shape)
        # names come from files (folder names, a cache's manifest): data, refused if OmegaConf would resolve them
        source = type(datamodule).__name__
        if "class_names" in model and model.class_names is None:
            model.class_names = data_strings(getattr(datamodule, "class_names", None), source, "class_names")
        if "prompts" in model and model.prompts is None:
            model.prompts = data_strings(getattr(datamodule, "prompts", None), source, "prompts")
        cond = cfg.get("conditioning")
        if cond is not None and "num_classes" in cond.keys() and OmegaConf.is_missing(cond, "num_classes"):
            if getattr(datamodule, "num_classes", None) is None:
                raise ValueError(
                    f"conditioning={cond._target_.rsplit('.', 1)[-1]} needs class labels but datamodule "
                    f"{type(datamodule).__name__} has none; use conditioning=none or a labelled dataset"
                )
            cond.num_classes = datamodule.num_classes


def resolve_ckpt_path(ckpt_path: str | None, output_dir, resume: str | None = None) -> str | None:
    """``last`` means <run>/checkpoints/last.ckpt; a path must exist; ``resume=auto`` finds the newest checkpoint."""
    return resolve_resume(ckpt_path, resume, output_dir)


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list, trainable_params: int | None = None) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with its plugins (a dict in the config), cluster plugins, the hardware that is
    there (a GPU recipe on a CPU-only machine runs on the CPU) and a precision it runs natively (``auto``)."""
    tcfg = fit_accelerator(OmegaConf.to_container(cfg.trainer, resolve=True))
    plugins_cfg = tcfg.pop("plugins", None) or {}
    plugin_cfgs = list(plugins_cfg.values()) if isinstance(plugins_cfg, dict) else list(plugins_cfg)
    plugins = [instantiate(p) if isinstance(p, dict) and "_target_" in p else p for p in plugin_cfgs if p is not None]
    shutdown = next((cb for cb in callbacks if isinstance(cb, GracefulShutdown)), None)
    plugins += cluster_plugins(shutdown.requeue_signal if shutdown else None, handled_elsewhere=shutdown is not None)
    tcfg["precision"] = resolve_precision(tcfg.get("precision"), tcfg.get("accelerator"), trainable_params)
    tcfg = fit_precision(tcfg)  # trainer=fsdp: a precision FSDP2 takes (16-mixed on old GPUs -> 32-true)
    if tcfg.get("enable_progress_bar") is False:  # `trainer.enable_progress_bar=false` drops the bar callback too
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    return instantiate(tcfg, callbacks=callbacks, logger=loggers or False, plugins=plugins or None)


def trainable_parameters(model: torch.nn.Module) -> int:
    """How many parameters the optimizer trains (frozen encoders and autoencoders are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate datamodule, model, callbacks, loggers and trainer from a composed config."""
    if cfg.get("init_from") and cfg.get("ckpt_path"):
        raise ConfigError("init_from (new run from old weights) and ckpt_path (resume the old run) exclude each other")
    ensure_valid(cfg, "train")  # the same checks the entry point's Hydra callback runs, for in-process callers
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate_reporting(cfg.datamodule)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        datamodule.prepare_data()  # fail fast on missing data (one line), before models and GPUs are set up
    fill_from_datamodule(cfg, datamodule)
    model = instantiate_reporting(cfg.model)
    if hasattr(model, "run_config"):
        model.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = instantiate_dict(cfg.get("callbacks"))
    callbacks += init_callbacks(model, cfg.get("init_from"), strict=bool(cfg.get("init_strict", True)))
    loggers = instantiate_dict(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers, trainable_parameters(model))
    return {"datamodule": datamodule, "model": model, "callbacks": callbacks, "loggers": loggers, "trainer": trainer}


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    """Every scalar the run ended with: ``trainer.callback_metrics`` plus the latest values the diagnostic callbacks
    published (sample metrics measured at the end of training arrive after Lightning's last ``log``)."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    for callback in trainer.callbacks:
        metrics.update(getattr(callback, "published", None) or {})
    return metrics


def write_final_metrics(cfg: DictConfig, trainer: L.Trainer, metrics: dict[str, float], stopped: bool) -> None:
    """``<run>/final_metrics.json`` (``difflab.utils.run_record``): the run's end state, last step and metrics."""
    write_record(cfg.paths.output_dir, metrics, trainer.global_step, stopped, cfg.get("optimized_metric"))


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value of ``optimized_metric`` that ``train.py`` returns to Hydra's sweeper (Optuna minimises or
    maximises it); None, with one warning naming what was logged, when the run never logged it."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        log.warning("optimized_metric=%s was not logged by this run; logged: %s", name, ", ".join(sorted(metrics)))
        return None
    return metrics[name]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything and fit; returns the built objects plus the final logged metrics.

    ``objs["stopped_by_signal"]`` is True when SIGTERM/SIGINT/the requeue signal stopped training (a checkpoint
    was saved). Whatever happens, the W&B run is finished and the DDP world of this job is torn down, so that the
    next job of a sweep starts clean. Global rank 0 holds the run directory's lock (``difflab.ops.run_lock``)
    throughout: a second run of the same directory stops with one line before it reads or writes a checkpoint.
    """
    print_lightning_lines_once()
    with run_dir_lock(cfg.paths.output_dir):  # one run per directory: a second one is refused before it writes
        ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir, cfg.get("resume"))
        if ckpt:
            refuse_changed_resume(ckpt, cfg)  # before loggers or checkpoints touch the run
        objs: dict[str, Any] = {}
        failed = True
        try:
            objs = build(cfg)
            trainer = objs["trainer"]
            if trainer.is_global_zero:
                remove_stale_temporaries(checkpoint_dir(trainer))
                if hasattr(objs["model"], "diffusion"):
                    write_protocol(cfg.paths.output_dir, objs["model"].diffusion.evaluation_protocol())
            for logger in objs["loggers"]:
                logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            log.info(
                "trainable parameters: %.2fM; precision: %s; output dir: %s%s",
                trainable_parameters(objs["model"]) / 1e6,
                trainer.precision,
                cfg.paths.output_dir,
                f"; resuming from {ckpt}" if ckpt else "",
            )
            trainer.fit(objs["model"], datamodule=objs["datamodule"], ckpt_path=ckpt, weights_only=True)
            log.info("training stopped by %s", stopping_bound(trainer))
            objs["metrics"] = final_metrics(trainer)
            shutdown = find_shutdown(trainer)
            objs["stopped_by_signal"] = bool(shutdown and shutdown.stopped)
            if trainer.is_global_zero:
                write_final_metrics(cfg, trainer, objs["metrics"], objs["stopped_by_signal"])
            failed = False
        finally:
            wandb_ops.finish(failed=failed)
            ddp_multirun.end_job(objs.get("trainer"))
    if objs["stopped_by_signal"]:
        shutdown.after_fit(objs["trainer"])  # a requeue signal: hand over to submitit / scontrol
    return objs
