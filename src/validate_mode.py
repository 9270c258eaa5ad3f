"""``--validate``: compose, run every start-time check, print what would run, and exit without writing anything.

Every console command takes the flag (``python train.py experiment=stl10_vpred_cfg --validate``, ``-m`` sweeps too).
The start-time checks are the ones a real start runs (``difflab.preflight.ValidateConfig``: values, inert
overrides, identical sweep jobs, a busy run directory); a config that passes them is described in one short block:
for training the process, the objective's prediction, the sampler and its steps, the denoiser, the conditioning, the
data, the precision as it resolves on this machine, the budget and the output directory. The model is built on the
``meta`` device to count its parameters (the CPU precision rule needs them), so no weights are allocated or loaded.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from difflab.utils.cli import FLAG


def _name(target: Any) -> str:
    return str(target or "?").rsplit(".", 1)[-1]


def _shown(value: Any) -> str:
    """A config value in the block; ``???`` (filled at start, e.g. a class count from the data) says so."""
    return str(value) if isinstance(value, (str, int, float, bool, list, tuple)) else "from the data"


def _keys(node: Any, keys: tuple[str, ...]) -> str:
    shown = [f"{k} {_shown(node.get(k))}" for k in keys if isinstance(node, dict) and node.get(k) is not None]
    return f" ({', '.join(shown)})" if shown else ""


def _precision(cfg: DictConfig, tree: dict) -> str:
    """The trainer precision as it resolves here, with the reason; the model built on ``meta`` for its size."""
    from difflab.ops.hardware import fit_accelerator
    from difflab.ops.precision import auto_precision

    trainer = fit_accelerator(dict(tree.get("trainer") or {}))
    precision = str(trainer.get("precision"))
    if precision != "auto":
        return f"{precision} (set by trainer.precision)"
    params = trainable_parameters(cfg)
    chosen, why = auto_precision(trainer.get("accelerator"), params)
    size = f"; {params / 1e6:.2f}M trainable parameters" if params is not None and "parameters" not in why else ""
    return f"{chosen} (auto: {why}{size})"


def trainable_parameters(cfg: DictConfig) -> int | None:
    """Trainable parameters of the run's model, built on the ``meta`` device (None when it cannot be built so)."""
    import logging

    import torch
    from hydra.utils import instantiate

    from difflab.pipeline import fill_from_datamodule
    from difflab.pipeline import trainable_parameters as count

    logging.disable(logging.INFO)  # the start-up lines of a real build would interleave with the block
    try:
        local = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        local.pop("hydra", None)
        fill_from_datamodule(local, instantiate(local.datamodule))
        with torch.device("meta"):
            return count(instantiate(local.model))
    except Exception:  # noqa: BLE001 - e.g. a text encoder that cannot be built on meta: the rule says the rest
        return None
    finally:
        logging.disable(logging.NOTSET)


def train_block(cfg: DictConfig, output_dir: str | None = None) -> list[str]:
    """What a training run would run, in a few lines (``output_dir``: shown instead of the resolved one)."""
    from difflab.utils.resolve import hydra_runtime, plain

    with hydra_runtime(cfg) as resolved:
        tree = plain(resolved)
    model = tree.get("model") or {}
    diffusion = model.get("diffusion") or {}
    process, objective, sampler = (diffusion.get(k) or {} for k in ("process", "objective", "sampler"))
    net, cond, data = model.get("net") or {}, diffusion.get("conditioner") or {}, tree.get("datamodule") or {}
    trainer, method = tree.get("trainer") or {}, model.get("method") or {}
    return [
        f"  method:       {_name(method.get('_target_') or 'DiffusionTraining')}"
        f"{_keys(method, ('teacher_ckpt', 'teacher_steps', 'student_steps', 'steps_per_round', 'num_pairs', 'double_every'))}",
        f"  process:      {_name(process.get('_target_'))}"
        f"{_keys(process, ('kind', 'density', 'shift', 'num_timesteps', 'spacing'))}",
        f"  objective:    prediction {objective.get('prediction')}, weighting {objective.get('weighting')}, "
        f"loss {objective.get('loss')}",
        f"  sampler:      {_name(sampler.get('_target_'))}{_keys(sampler, ('steps', 'eta', 's_churn'))}",
        f"  denoiser:     {_name(net.get('_target_'))}"
        f"{_keys(net, ('preset', 'base_channels', 'channel_mults', 'hidden_dim', 'depth', 'patch_size'))}",
        f"  conditioning: {_name(cond.get('_target_'))}{_keys(cond, ('num_classes', 'encoder'))}; guidance "
        f"{_name((diffusion.get('guidance') or {}).get('_target_'))} {(diffusion.get('guidance') or {}).get('scale')}; "
        f"optimizer {_name((model.get('optimizer') or {}).get('_target_'))} lr {model.get('lr')}",
        f"  data:         {_name(data.get('_target_'))}{_keys(data, ('image_size', 'batch_size', 'cache_dir'))}",
        f"  precision:    {_precision(cfg, tree)}",
        f"  budget:       max_steps {trainer.get('max_steps')}, max_time {trainer.get('max_time')}",
        f"  output dir:   {output_dir or (tree.get('paths') or {}).get('output_dir')}",
    ]


def generic_block(cfg: DictConfig, primary: str | None) -> list[str]:
    """The top-level values of another command's config (ckpt_path, out_dir, n, ...)."""
    from difflab.utils.resolve import hydra_runtime, plain

    with hydra_runtime(cfg) as resolved:
        tree = plain(resolved)
    return [
        f"  {k + ':':13} {v}"
        for k, v in tree.items()
        if k not in ("hydra", "paths", "task_name") and not isinstance(v, (dict, list)) and v is not None
    ]


def report(cfg: DictConfig, primary: str | None, jobs: list[list[str]] | None = None) -> None:
    """Print the validate block (one per job of a sweep, composed from its overrides) and exit with status 0."""
    import sys

    from difflab.config_effects import hydra_composer

    command = f"difflab-{primary.replace('_', '-')}" if primary else "the command"
    if jobs:
        compose = hydra_composer(primary or "train")
        sweep_dir = OmegaConf.select(cfg, "hydra.sweep.dir")
        for i, overrides in enumerate(jobs):
            job_cfg = compose(overrides)
            print(f"valid: job {i}: {command} {' '.join(overrides)}")
            print(
                "\n".join(
                    train_block(job_cfg, f"{sweep_dir}/{i}") if primary == "train" else generic_block(job_cfg, primary)
                )
            )
    else:
        print(f"valid: {command} {' '.join(cfg.hydra.overrides.task)}".rstrip())
        print("\n".join(train_block(cfg) if primary == "train" else generic_block(cfg, primary)))
    print(f"nothing was written ({FLAG})")
    sys.exit(0)
