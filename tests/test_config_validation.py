"""Validated configuration: every user-settable value is checked when a job starts (src/config_checks.py with the rules
in configs/<group>/schema.py and configs/schema.py). A bad one is one line `error: <key>=<value> is invalid: <what
is allowed>`, exit status 2, no traceback, nothing written. Most cases compose in-process (fast); a few run the real
console commands."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from difflab.config_checks import check_config, ensure_valid, group_schemas, primary_schemas
from difflab.configs import CONFIG_DIR
from difflab.preflight import ValidateConfig
from difflab.utils.errors import ConfigError
from tests.helpers import TEACHER_SETUP, default_teacher_checkpoint

FILE = "{file}"  # an existing regular file (a stand-in checkpoint, or an output path that is a file)
NOWHERE = "{nowhere}"  # a path that does not exist
DISTILLATIONS = (
    "digits_progressive",
    "digits_progressive_guided",
    "digits_reflow",
    "digits_reflow_guided",
    "digits_consistency",
    "digits_consistency_guided",
    "digits_scm",
    "digits_scm_guided",
)  # experiments that need a teacher

# (entry point, overrides, the key and value the error line must name). One bad value per case.
BAD = [
    # train: model
    ("train", ["model.lr=-1"], "model.lr", "-1"),
    ("train", ["model.lr=0"], "model.lr", "0"),
    ("train", ["optimizer.betas=[0.9,1.5]"], "optimizer.betas", "[0.9, 1.5]"),
    ("train", ["optimizer.weight_decay=-0.1"], "optimizer.weight_decay", "-0.1"),
    ("train", ["optimizer=muon", "optimizer.adjust_lr_fn=keller"], "optimizer.adjust_lr_fn", "keller"),
    ("train", ["lr_schedule.warmup=-5"], "lr_schedule.warmup", "-5"),
    ("train", ["lr_schedule.budget=wall"], "lr_schedule.budget", "wall"),
    ("train", ["lr_schedule=linear_restarts"], "lr_schedule.period", "null"),  # no method with rounds to set it
    ("train", ["lr_schedule=linear_restarts", "lr_schedule.period=0"], "lr_schedule.period", "0"),
    ("train", ["experiment=digits_progressive", "method.steps_per_round=0"], "method.steps_per_round", "0"),
    ("train", ["experiment=digits_progressive", f"method.teacher_ckpt={NOWHERE}"], "method.teacher_ckpt", NOWHERE),
    ("train", ["experiment=digits_reflow", "method.num_pairs=0"], "method.num_pairs", "0"),
    ("train", ["experiment=digits_consistency", "method.double_every=0"], "method.double_every", "0"),
    ("train", ["experiment=digits_consistency", "method.huber_c=-1"], "method.huber_c", "-1"),
    ("train", ["experiment=digits_scm", "method.tangent_c=0"], "method.tangent_c", "0"),
    ("train", ["experiment=digits_scm", "method.warmup_steps=-1"], "method.warmup_steps", "-1"),
    ("train", ["experiment=digits_meanflow", "method.ratio=1.5"], "method.ratio", "1.5"),
    ("train", ["experiment=digits_meanflow", "method.adaptive_c=0"], "method.adaptive_c", "0"),
    ("train", ["experiment=digits_meanflow", "method.kappa=1"], "method.kappa", "1"),
    ("train", ["method.adaptive_weighting=sometimes"], "method.adaptive_weighting", "sometimes"),
    (
        "train",
        ["experiment=digits_progressive", "method.guidance_scales=[1,2,3]"],
        "method.guidance_scales",
        "[1, 2, 3]",
    ),
    ("train", ["guidance=distilled", "guidance.scale=-1"], "guidance.scale", "-1"),
    ("train", ["callbacks.ema.sigma_rel=0.08"], "callbacks.ema.sigma_rel", "0.08"),
    ("train", ["callbacks.ema.decay=null"], "callbacks.ema.decay", "null"),
    ("train", ["callbacks.ema.decay=null", "callbacks.ema.sigma_rel=0.5"], "callbacks.ema.sigma_rel", "0.5"),
    ("train", ["model.diffusion.p_uncond=1.0"], "model.diffusion.p_uncond", "1.0"),
    ("train", ["guidance.scale=-2"], "guidance.scale", "-2"),
    ("train", ["guidance.interval=[5,1]"], "guidance.interval", "[5, 1]"),
    ("train", ["model.net.base_channels=0"], "model.net.base_channels", "0"),
    ("train", ["model.net.channel_mults=[]"], "model.net.channel_mults", "[]"),
    ("train", ["model.net.attention_levels=[5]"], "model.net.attention_levels", "[5]"),
    ("train", ["model.net.dropout=1.5"], "model.net.dropout", "1.5"),
    ("train", ["model.compile=maybe"], "model.compile", "maybe"),
    ("train", ["model=vivit", "model.net.hidden_dim=100"], "model.net.hidden_dim", "100"),
    ("train", ["model=unet3d", "model.net.temporal_kernel=2"], "model.net.temporal_kernel", "2"),
    ("train", ["experiment=digits_vae", "model.recon_loss=l3"], "model.recon_loss", "l3"),
    # train: datamodule
    ("train", ["datamodule.batch_size=0"], "datamodule.batch_size", "0"),
    ("train", ["datamodule.num_workers=-1"], "datamodule.num_workers", "-1"),
    ("train", ["datamodule.image_size=0"], "datamodule.image_size", "0"),
    ("train", ["datamodule.val_fraction=1.0"], "datamodule.val_fraction", "1.0"),
    ("train", ["datamodule=cifar10", "datamodule.val_split=train"], "datamodule.val_split", "train"),
    ("train", ["datamodule=stl10", "datamodule.fold=12"], "datamodule.fold", "12"),
    ("train", ["datamodule=moving_digits", "datamodule.digit_size=40"], "datamodule.digit_size", "40"),
    ("train", ["datamodule=latents"], "datamodule.cache_dir", "???"),
    # train: trainer
    ("train", ["trainer.max_steps=-2"], "trainer.max_steps", "-2"),
    ("train", ["trainer.precision=17"], "trainer.precision", "17"),
    ("train", ["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches", "0"),
    ("train", ["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val", "-1"),
    ("train", ["trainer.val_check_interval=0"], "trainer.val_check_interval", "0"),
    ("train", ["trainer.val_check_interval=0.5"], "trainer.val_check_interval", "0.5"),
    ("train", ["trainer.devices=0"], "trainer.devices", "0"),
    ("train", ["trainer.accelerator=gpux"], "trainer.accelerator", "gpux"),
    ("train", ["trainer.max_time=6min"], "trainer.max_time", "6min"),
    ("train", ["trainer.log_every_n_steps=-1"], "trainer.log_every_n_steps", "-1"),
    # train: sampler, schedule, objective, conditioning, autoencoder
    ("train", ["sampler.steps=0"], "sampler.steps", "0"),
    ("train", ["sampler=ddim", "sampler.eta=-0.5"], "sampler.eta", "-0.5"),
    ("train", ["sampler.steps=null"], "sampler.steps", "null"),
    ("train", ["process=vp", "sampler.steps=5000"], "sampler.steps", "5000"),
    # sampler.spacing: a name on vp, flow's grid shift (a number) on flow (configs/schema.py)
    ("train", ["sampler.spacing=trailing"], "sampler.spacing", "trailing"),
    ("train", ["process=vp", "sampler.spacing=0.5"], "sampler.spacing", "0.5"),
    ("train", ["sampler.spacing=-1"], "sampler.spacing", "-1"),
    ("train", ["process.sampling_shift=0"], "process.sampling_shift", "0"),
    ("train", ["schedule.num_timesteps=1"], "schedule.num_timesteps", "1"),
    ("train", ["schedule.spacing=middle"], "schedule.spacing", "middle"),
    ("train", ["schedule=linear", "schedule.beta_end=1.5"], "schedule.beta_end", "1.5"),
    ("train", ["objective.prediction=score"], "objective.prediction", "score"),
    ("train", ["objective.snr_min=20"], "objective.snr_max", "10.0"),
    ("train", ["process=edm", "process.sigma_max=-1"], "process.sigma_max", "-1"),
    ("train", ["process=flow", "process.density=gaussian"], "process.density", "gaussian"),
    ("train", ["conditioning.embed_dim=0"], "conditioning.embed_dim", "0"),
    ("train", ["conditioning=text_minilm", "conditioning.pooling=max"], "conditioning.pooling", "max"),
    ("train", ["experiment=digits_vae", "autoencoder.latent_channels=0"], "autoencoder.latent_channels", "0"),
    # train: callbacks (incl. the ops group, merged into callbacks) and loggers
    ("train", ["callbacks.ema.decay=1.5"], "callbacks.ema.decay", "1.5"),
    ("train", ["callbacks.class_grid.every_n_steps=-1"], "callbacks.class_grid.every_n_steps", "-1"),
    ("train", ["callbacks.class_grid.n_cols=0"], "callbacks.class_grid.n_cols", "0"),
    ("train", ["callbacks.class_grid.judge=gpt"], "callbacks.class_grid.judge", "gpt"),
    # a frame bucket beyond the video transformer's temporal positions (configs/schema.py)
    ("train", ["experiment=moving_digits_t2v_dit", "datamodule.max_frames=64"], "model.net.max_frames", "16"),
    ("train", ["callbacks.model_checkpoint.mode=best"], "callbacks.model_checkpoint.mode", "best"),
    # metrics that no configured callback logs (configs/schema.py monitored_metrics_are_logged)
    (
        "train",
        ["callbacks.model_checkpoint.monitor=metrics/fd_digit100"],
        "callbacks.model_checkpoint.monitor",
        "metrics/fd_digit100",
    ),
    ("train", ["callbacks=metrics", "optimized_metric=metrics/fd_digit500"], "optimized_metric", "metrics/fd_digit500"),
    ("train", ["callbacks=metrics", "optimized_metric=metrics/fd_lenet500"], "optimized_metric", "metrics/fd_lenet500"),
    (
        "train",
        [
            "callbacks=metrics",
            "callbacks.sample_metrics.second_opinions=false",
            "optimized_metric=metrics/recall_digit100",
        ],
        "optimized_metric",
        "metrics/recall_digit100",
    ),
    (
        "train",
        ["callbacks.class_grid.judge=none", "optimized_metric=metrics/grid_agreement"],
        "optimized_metric",
        "metrics/grid_agreement",
    ),
    (
        "train",
        [
            "callbacks=metrics",
            "callbacks.model_checkpoint.monitor=metrics/fd_digit100",
            "callbacks.model_checkpoint.every_n_train_steps=300",
        ],
        "callbacks.model_checkpoint.every_n_train_steps",
        "300",
    ),
    ("train", ["callbacks.model_checkpoint.save_top_k=-2"], "callbacks.model_checkpoint.save_top_k", "-2"),
    ("train", ["callbacks=diagnostics", "callbacks.guidance_grid.scales=[]"], "callbacks.guidance_grid.scales", "[]"),
    ("train", ["callbacks.nonfinite_guard.max_consecutive=-1"], "callbacks.nonfinite_guard.max_consecutive", "-1"),
    ("train", ["callbacks.graceful_shutdown.signals=[SIGFOO]"], "callbacks.graceful_shutdown.signals", "[SIGFOO]"),
    ("train", ["logger=wandb", "logger.wandb.mode=sometimes"], "logger.wandb.mode", "sometimes"),
    # train: top level and paths
    ("train", ["seed=-1"], "seed", "-1"),
    ("train", ["resume=always"], "resume", "always"),
    ("train", [f"ckpt_path={NOWHERE}"], "ckpt_path", NOWHERE),
    ("train", [f"init_from={FILE}", f"ckpt_path={FILE}"], "init_from", FILE),
    ("train", ["init_strict=maybe"], "init_strict", "maybe"),
    ("train", [f"paths.data_dir={FILE}"], "paths.data_dir", FILE),
    # sample
    ("sample", [f"ckpt_path={FILE}", "n=-3"], "n", "-3"),
    ("sample", [f"ckpt_path={FILE}", "n=0"], "n", "0"),
    ("sample", [f"ckpt_path={FILE}", "batch_size=0"], "batch_size", "0"),
    ("sample", [f"ckpt_path={FILE}", f"out_dir={FILE}"], "out_dir", FILE),
    ("sample", [f"ckpt_path={FILE}", "device=gpu"], "device", "gpu"),
    ("sample", [f"ckpt_path={FILE}", "labels=[1,-2]"], "labels", "[1, -2]"),
    ("sample", [f"ckpt_path={FILE}", "guidance.scale=-1"], "guidance.scale", "-1"),
    ("sample", [f"ckpt_path={FILE}", "seed=abc"], "seed", "abc"),
    ("sample", [f"ckpt_path={FILE}", "sampler=ddim", "sampler.eta=-1"], "sampler.eta", "-1"),
    ("sample", [f"ckpt_path={NOWHERE}"], "ckpt_path", NOWHERE),
    ("sample", [], "ckpt_path", "???"),
    # export
    ("export", [f"ckpt_path={FILE}", "weights=best"], "weights", "best"),
    ("export", [f"ckpt_path={FILE}", f"out_dir={FILE}/sub"], "out_dir", f"{FILE}/sub"),
    ("export", [f"ckpt_path={NOWHERE}"], "ckpt_path", NOWHERE),
    # report
    ("report", [f"ckpt_path={FILE}", "device=tpu"], "device", "tpu"),
    ("report", [f"ckpt_path={FILE}", "val_batches=0"], "val_batches", "0"),
    ("report", [f"ckpt_path={FILE}", "figures=reconstruction"], "figures", "reconstruction"),
    ("report", [f"ckpt_path={FILE}", "callbacks.guidance_grid.scales=[-1]"], "callbacks.guidance_grid.scales", "[-1]"),
    ("report", [f"ckpt_path={FILE}", "+datamodule.batch_size=0"], "datamodule.batch_size", "0"),
    # encode_latents
    ("encode_latents", [], "out_dir", "???"),
    ("encode_latents", ["out_dir=lat", "splits=[val]"], "splits", "[val]"),
    ("encode_latents", ["out_dir=lat", "dtype=int8"], "dtype", "int8"),
    ("encode_latents", ["out_dir=lat", "batch_size=0"], "batch_size", "0"),
    ("encode_latents", ["out_dir=lat", "target_std=0"], "target_std", "0"),
    ("encode_latents", ["out_dir=lat", "datamodule.batch_size=-1"], "datamodule.batch_size", "-1"),
    ("encode_latents", ["out_dir=lat", f"autoencoder.ckpt_path={NOWHERE}"], "autoencoder.ckpt_path", NOWHERE),
]

# Values the rules must let through (special meanings documented in the configs and the code).
GOOD = [
    (
        "train",
        [
            "callbacks=metrics",
            "callbacks.model_checkpoint.monitor=metrics/fd_digit100",
            "callbacks.model_checkpoint.save_top_k=1",
            "optimized_metric=metrics/digit_accuracy",
        ],
    ),
    ("train", ["optimized_metric=metrics/grid_agreement", "callbacks.model_checkpoint.monitor=val_loss_t/bucket_03"]),
    ("train", ["callbacks=metrics", "optimized_metric=metrics/fd_lenet100"]),
    ("train", ["callbacks=metrics", "optimized_metric=metrics/precision_lenet100_floor"]),
    ("train", ["callbacks=metrics", "callbacks.model_checkpoint.monitor=metrics/lenet_accuracy"]),
    ("train", ["callbacks.model_checkpoint.monitor=metrics/grid_agreement", "callbacks.model_checkpoint.mode=max"]),
    ("train", ["trainer.precision=bf16-mixed", "trainer.devices=[0,1]", "trainer.log_every_n_steps=0"]),
    ("train", ["trainer.val_check_interval=0.5", "trainer.check_val_every_n_epoch=1", "trainer.max_time=00:01:00:00"]),
    ("train", ["trainer=ddp", "trainer.devices=-1", "trainer.precision=16", "trainer.max_epochs=null"]),
    (
        "train",
        ["process=vp", "sampler=ddpm", "sampler.steps=null", "sampler.variance=large", "schedule.spacing=trailing"],
    ),
    ("train", ["guidance.scale=0", "guidance.interval=[null,5]", "guidance.per_class={{3: 4.0}}"]),
    ("train", ["callbacks.class_grid.every_n_steps=0", "callbacks.ema.decay=0", "ckpt_path=last", "resume=never"]),
    ("train", ["callbacks.ema.decay=null", "callbacks.ema.sigma_rel=0.08", "callbacks.ema.update_every=4"]),
    ("train", ["datamodule=moving_digits", "datamodule.image_size=[16,16]", "lr_schedule.warmup=200"]),
    ("train", ["datamodule=cifar10", "datamodule.val_split=0.1", "datamodule.image_size=null", "seed=null"]),
    (
        "train",
        ["objective.x0_clip=null", "objective.weighting=min_snr", "conditioning=none", "model.diffusion.p_uncond=0"],
    ),
    ("sample", [f"ckpt_path={FILE}", "labels=[0,3]", "device=cuda:1", "guidance.scale=null", "sampler=heun"]),
    ("sample", [f"ckpt_path={FILE}", "sampler.steps=25", "guidance.interval=[0.5,null]", "out_dir=new/dir"]),
    ("report", [f"ckpt_path={FILE}", "figures=[reconstruction,guidance_grid]", "val_batches=null", "device=cpu"]),
    ("encode_latents", ["out_dir=lat", "splits=[train,val,test]", "dtype=float32", "autoencoder=diffusers_kl"]),
]

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
GROUP_OPTIONS = sorted(
    f"{p.parent.name}={p.stem}"
    for group in (
        "model",
        "datamodule",
        "trainer",
        "sampler",
        "schedule",
        "objective",
        "conditioning",
        "callbacks",
        "logger",
        "ops",
        "autoencoder",
        "process",
        "hparams_search",
    )
    for p in (CONFIG_DIR / group).glob("*.yaml")
)
# Keys no user sets: filled in from the datamodule, or interpolations of whole groups (checked in their group).
DERIVED = (
    "model.method",  # ${method}: the method group's own rules
    "model.diffusion.sample_shape",
    "model.diffusion.process",
    "model.diffusion.objective",
    "model.diffusion.sampler",
    "model.diffusion.guidance",
    "model.diffusion.conditioner",
    "model.diffusion.autoencoder",
    "model.optimizer",
    "model.lr_schedule",
)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("validation")
    (root / "file.ckpt").write_text("not a real checkpoint: validation only checks that it exists")
    teacher = default_teacher_checkpoint(root / "teacher")  # distillation's pre-flight reads its stored network
    own = {f"teacher_{e}": str(default_teacher_checkpoint(root / e, o)) for e, o in TEACHER_SETUP.items()}
    return {"file": str(root / "file.ckpt"), "nowhere": str(root / "nowhere.ckpt"), "teacher": str(teacher), **own}


@functools.lru_cache(maxsize=None)
def _compose(primary: str, overrides: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(primary, overrides=list(overrides), return_hydra_config=True)


def problems_of(primary: str, overrides, paths: dict[str, str]) -> list[str]:
    return check_config(_compose(primary, tuple(o.format(**paths) for o in overrides)), primary)


def _case_id(case) -> str:
    return f"{case[0]}:{' '.join(case[1]) or '(defaults)'}"


def test_bad_input_list_covers_every_group_and_entry_point():
    """The issue asks for at least 40 bad values across all groups and entry points."""
    assert len(BAD) >= 40
    assert {entry for entry, *_ in BAD} == {"train", "sample", "export", "report", "encode_latents"}
    named = {key.split(".")[0] for _, _, key, _ in BAD}
    assert set(group_schemas()) <= named


@pytest.mark.parametrize("case", BAD, ids=_case_id)
def test_bad_value_is_one_problem_naming_key_value_and_allowed(case, paths):
    primary, overrides, key, value = case
    problems = problems_of(primary, overrides, paths)
    assert len(problems) == 1, problems
    line, value = problems[0], value.format(**paths)
    assert "\n" not in line and key in line and value in line, line
    if not ("not found:" in line or ": no checkpoint at " in line):  # the lines kept from the loaders
        expected = f"{key}={value} is invalid: "
        assert line.startswith(expected) and len(line) > len(expected) + 3, line


def test_missing_checkpoints_keep_the_loaders_lines(paths):
    """A missing checkpoint gets the line the loaders give (src/checkpoints.py, src/ops/resume.py), now before anything
    is written."""
    nowhere = paths["nowhere"]
    for primary in ("sample", "export", "report"):
        assert problems_of(primary, [f"ckpt_path={nowhere}"], paths) == [
            f"checkpoint not found: {nowhere} (check ckpt_path)"
        ]
    assert problems_of("sample", [f"ckpt_path={nowhere}.safetensors"], paths) == [
        f"export not found: {nowhere}.safetensors (ckpt_path must be an export dir or a .safetensors file)"
    ]
    assert problems_of("train", [f"ckpt_path={nowhere}"], paths) == [f"ckpt_path={nowhere}: no checkpoint at {nowhere}"]


@pytest.mark.parametrize("case", GOOD, ids=_case_id)
def test_good_values_pass(case, paths):
    assert problems_of(*case, paths) == []


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_shipped_experiments_pass(experiment, paths):
    extra = _asks(experiment) + (["init_from={file}"] if experiment == "stl10_finetune" else [])  # init_from=???
    assert problems_of("train", [f"experiment={experiment}", *extra], paths) == []


def _asks(experiment: str) -> list[str]:
    """What an experiment asks the user for (a teacher checkpoint) as the shipped-config tests give it."""
    if experiment not in DISTILLATIONS:
        return []
    return [
        f"method.teacher_ckpt={{teacher_{experiment}}}"
        if experiment in TEACHER_SETUP
        else "method.teacher_ckpt={teacher}"
    ]


def _shipped() -> list[tuple[str, list[str]]]:
    required = {
        "datamodule=latents": ["datamodule.cache_dir=data/latents"],
        "datamodule=latents_stream": ["datamodule.cache_dir=data/latents"],
        "datamodule=clips_stream": ["datamodule.cache_dir=data/clips"],  # ??? in the yaml: a user gives it
        "sampler=ddpm": ["process=vp"],
    }  # the default digits recipe is flow; ddpm is vp's ancestral chain
    return (
        [("train", [])]
        + [("train", [option, *required.get(option, [])]) for option in GROUP_OPTIONS]
        + [
            ("sample", ["ckpt_path={file}"]),
            ("export", ["ckpt_path={file}"]),
            ("report", ["ckpt_path={file}"]),
            ("encode_latents", ["out_dir=lat"]),
            ("prepare_clips", ["out_dir=clips"]),
        ]
    )


def test_default_configs_and_group_options_pass(paths):
    for primary, overrides in _shipped():
        assert problems_of(primary, overrides, paths) == [], (primary, overrides)


def _leaves(tree, prefix=()):
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from _leaves(value, (*prefix, str(key)))
    elif tree is not None and tree != {} and not re.fullmatch(r"\$\{\w+\}", str(tree)):  # ${group}: checked there
        yield prefix


def _covered(path: tuple[str, ...], patterns) -> bool:
    for pattern in patterns:
        parts = pattern.split(".")
        if len(parts) <= len(path) and all(p in ("*", k) for p, k in zip(parts, path)):
            return True
    return False


def test_every_user_settable_value_has_a_rule(paths):
    """Each leaf of every shipped config (defaults, group options, experiments) is covered by a rule, so a new key in a
    yaml file needs a rule in its group's schema.py."""
    groups = group_schemas()
    rules, _ = primary_schemas()
    uncovered = set()
    for primary, overrides in _shipped() + [("train", [f"experiment={e}", *_asks(e)]) for e in EXPERIMENTS]:
        cfg = _compose(primary, tuple(o.format(**paths) for o in overrides))
        tree = OmegaConf.to_container(cfg, resolve=False)
        tree.pop("hydra")
        for path in _leaves(tree):
            if path[-1] in ("_target_", "_partial_", "_recursive_") or path[0] == "trainer" and path[1] == "plugins":
                continue
            if any(".".join(path) == d or ".".join(path).startswith(d + ".") for d in DERIVED):
                continue
            if not (
                _covered(path, rules.get(primary, {}))
                or path[0] in groups
                and _covered(path[1:], [p for p, _ in groups[path[0]][0]])
            ):
                uncovered.add(f"{primary}: {'.'.join(path)}")
    assert not uncovered, sorted(uncovered)


def test_first_problem_is_the_value_set_not_those_derived_from_it(paths):
    """paths.log_dir=<a file> also spoils the run, checkpoint and logger directories below it: log_dir comes first."""
    problems = problems_of("train", [f"paths.log_dir={FILE}"], paths)
    assert problems[0] == f"paths.log_dir={paths['file']} is invalid: a directory path, not an existing file"
    assert any(p.startswith("callbacks.model_checkpoint.dirpath=") for p in problems[1:])


def test_a_key_that_is_only_another_bad_key_is_not_reported_again():
    """One mistake, one line: keys that are nothing but ``${bad}``, ``${oc.select:bad,...}`` or a resolver of it
    (``${round_gcd:${bad}}``, ``${round_total:${bad},${other}}``) are dropped; values built from a bad key, or from a
    good one, or a resolver whose first argument is another key, keep their line."""
    from difflab.config_checks import _without_echoes, interpolated_keys

    cfg = OmegaConf.create(
        {
            "a": {"n": 0, "ok": 3},
            "b": {"same": "${a.n}", "select": "${oc.select:a.n,null}", "built": "${a.n}/x", "other": "${a.ok}"},
            "c": {
                "of": "${round_gcd:${a.n}}",
                "of_two": "${oc.decode:${a.n}${a.ok}}",
                "sized": "${round_total:${a.n},${a.ok}}",
                "sizing": "${round_total:${a.ok},${a.n}}",
            },
        }
    )
    keys = ("a.n", "b.same", "b.select", "b.built", "b.other", "c.of", "c.of_two", "c.sized", "c.sizing")
    problems = [(k, f"{k}=... is invalid") for k in keys]
    kept = [key for key, _ in _without_echoes(cfg, problems, interpolated_keys(cfg))]
    assert kept == ["a.n", "b.built", "b.other", "c.of_two", "c.sizing"]


def test_in_process_pipeline_path(tmp_path):
    """The tests' path (compose_train -> difflab.pipeline) composes without a hydra node: ensure_valid raises a
    one-line ConfigError there."""
    from tests.helpers import compose_train

    assert check_config(compose_train(tmp_path, []), "train") == []
    cfg = compose_train(tmp_path, ["datamodule.batch_size=0"])
    with pytest.raises(ConfigError, match=r"^datamodule.batch_size=0 is invalid: an integer >= 1$"):
        ensure_valid(cfg, "train")


def test_multirun_job_is_checked_and_swept_keys_wait_for_their_job(paths):
    import copy

    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    cfg = copy.deepcopy(_compose("train", ("model.lr=-1",)))
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.output_dir = paths["nowhere"] + "_run"
        cfg.hydra.job.config_name = "train"
        cfg.hydra.overrides.task = ["model.lr=-1,-2"]
    with pytest.raises(SystemExit) as exit_:
        ValidateConfig().on_job_start(config=cfg)
    assert exit_.value.code == 2
    ValidateConfig().on_multirun_start(config=cfg)  # model.lr is swept: left to each job
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.overrides.task = ["model.lr=-1", "trainer.max_steps=1,2"]
    with pytest.raises(SystemExit) as exit_:
        ValidateConfig().on_multirun_start(config=cfg)  # not swept: refused before the sweep writes anything
    assert exit_.value.code == 2


@pytest.mark.parametrize(
    "swept,expected",
    [
        (("seed",), ["chained", "ckpt_path", "selected"]),  # direct, through another key, through a resolver
        (("guidance.scale",), ["method.teacher_guidance", "model.scale"]),  # the node holding it, the key itself
        (("guidance",), ["method.teacher_guidance", "model.method", "model.scale"]),  # a group sweep: keys under it
        (("model.seed",), []),  # another key named seed: nothing refers to it
        (("seeds",), []),
    ],
)
def test_the_keys_a_sweep_sets_include_those_that_interpolate_a_swept_key(swept, expected):
    from omegaconf import OmegaConf

    from difflab.preflight import _keys_interpolating

    cfg = OmegaConf.create(
        {
            "seed": 0,
            "seeds": [0],
            "ckpt_path": "/runs/s${seed}/last.ckpt",
            "chained": "${ckpt_path}.bak",
            "selected": "${oc.select:seed,1}",
            "guidance": {"scale": 2.0, "method": "cfg"},
            "method": {"teacher_guidance": "${guidance}"},
            "model": {"seed": 3, "scale": "${guidance.scale}", "method": "${guidance.method}", "lr": 1e-3},
            "hydra": {"run": {"dir": "logs/${seed}"}},
        }
    )
    assert list(_keys_interpolating(cfg, swept)) == expected


def test_a_sweep_whose_path_interpolates_a_swept_seed_waits_for_each_job(tmp_path):
    """``ckpt_path=<dir>/s${seed}/x.ckpt seed=1,2``: the base config's seed (0) names a file that need not exist, so
    the up-front check leaves the path to each job; a path that interpolates nothing swept is still checked."""
    import copy

    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    for seed in (1, 2):
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "x.ckpt").write_text("validation only checks that it exists")
    pattern = f"{tmp_path}/s${{seed}}/x.ckpt"
    cfg = copy.deepcopy(_compose("sample", (f"ckpt_path={pattern}",)))
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.config_name = "sample"
        cfg.hydra.overrides.task = [f"ckpt_path={pattern}", "seed=1,2"]
    ValidateConfig().on_multirun_start(config=cfg)  # seed 0's s0/x.ckpt is missing: not this sweep's business
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.overrides.task = [f"ckpt_path={pattern}", "n=10,20"]
    with pytest.raises(SystemExit) as exit_:  # seed is not swept: s0/x.ckpt is what every job would load
        ValidateConfig().on_multirun_start(config=cfg)
    assert exit_.value.code == 2


# ---------------------------------------------------------------- the real console commands, in a fresh directory
COMMANDS = [
    (["difflab-train", "model.lr=-1"], "model.lr=-1 is invalid: a number > 0"),
    (["difflab-train", "datamodule.batch_size=0"], "datamodule.batch_size=0 is invalid: an integer >= 1"),
    (["difflab-sample", "n=-3", "ckpt_path=ckpt.ckpt"], "n=-3 is invalid: an integer >= 1"),
    (["difflab-sample", "out_dir=taken.txt", "ckpt_path=ckpt.ckpt"], "out_dir=taken.txt is invalid: a directory path"),
    (["difflab-export", "ckpt_path=ckpt.ckpt", "weights=best"], "weights=best is invalid: one of ema, raw"),
    (["difflab-report", "ckpt_path=missing.ckpt"], "checkpoint not found: missing.ckpt (check ckpt_path)"),
    (["difflab-encode-latents", "out_dir=lat", "splits=[val]"], "splits=[val] is invalid: a list of splits"),
]


def _command(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", f"difflab.{name.split('-', 1)[1].replace('-', '_')}"]


@pytest.mark.parametrize("argv,message", COMMANDS, ids=[" ".join(a) for a, _ in COMMANDS])
def test_console_command_rejects_bad_value_writing_nothing(argv, message, tmp_path):
    (tmp_path / "ckpt.ckpt").write_text("x")
    (tmp_path / "taken.txt").write_text("x")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}  # a traceback would show in full
    env.pop("DIFFLAB_ROOT", None)
    proc = subprocess.run(
        [*_command(argv[0]), *argv[1:]], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), proc.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_cfg_and_help_are_not_validated(tmp_path):
    """--cfg shows a config as composed, bad values included; --help stays fast (no torch import on the way)."""
    proc = subprocess.run(
        [*_command("difflab-train"), "--cfg", "job", "model.lr=-1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "lr: -1" in proc.stdout, proc.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, difflab.config_checks; sys.exit(any(m in sys.modules for m in ('torch', 'lightning')))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, "difflab.config_checks must not import torch or lightning"
    assert list(tmp_path.iterdir()) == []


def test_init_from_weights_of_another_time_input_are_refused_unless_not_strict(paths):
    """A denoiser trained on 1000 t reads t as almost zero (BENCHMARKS.md section 16d): one line before the run."""
    problems = problems_of("train", ["init_from={teacher}", "process.time_scale=1"], paths)
    assert len(problems) == 1 and problems[0].startswith("init_from="), problems
    assert "time_scale=1000 where this run has 1 " in problems[0] and "init_strict=false" in problems[0]
    problems = problems_of("train", ["init_from={teacher_digits_scm}"], paths)  # the other way round
    assert len(problems) == 1 and "time_scale=1 where this run has 1000 " in problems[0], problems
    assert problems_of("train", ["init_from={teacher}", "process.time_scale=1", "init_strict=false"], paths) == []
    assert problems_of("train", ["init_from={teacher}"], paths) == []
    assert problems_of("train", ["init_from={teacher_digits_scm}", "process.time_scale=1"], paths) == []
