"""train.yaml says what runs: its defaults list is what `python train.py --cfg job` composes (the default experiment
changes no group), and the objective's target comes from the process through the objective configs' interpolation,
never from a process file writing into another group."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir

from difflab.configs import CONFIG_DIR
from tests.helpers import ROOT


def listed_defaults() -> dict[str, str | None]:
    """``{group: option}`` of train.yaml's defaults list."""
    entries = yaml.safe_load((CONFIG_DIR / "train.yaml").read_text())["defaults"]
    return {k: v for entry in entries if isinstance(entry, dict) for k, v in entry.items()}


def composed(overrides=()):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_the_default_experiment_keeps_every_group_train_yaml_lists():
    cfg = composed()
    choices = cfg.hydra.runtime.choices
    listed = {g: o for g, o in listed_defaults().items() if o is not None}
    assert {g: choices[g] for g in listed} == listed
    assert listed["process"] == "flow" and listed["sampler"] == "heun" and listed["model"] == "unet2d_small"


def test_cfg_job_shows_the_listed_defaults():
    """The printed job config: the process, sampler and denoiser train.yaml lists, and the process's own target."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--cfg", "job", "--resolve"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    job = yaml.safe_load(out.stdout)
    assert job["process"]["_target_"] == "difflab.diffusion.processes.FlowProcess"
    assert job["sampler"]["_target_"].endswith(".heun")
    assert (job["objective"]["prediction"], job["objective"]["weighting"]) == ("flow", "uniform")
    assert first(job["model"], "net")["base_channels"] == 16  # unet2d_small's width


def first(tree: dict, key: str):
    """The first node named ``key`` in a nested config (the model's denoiser, wherever the module nests it)."""
    if key in tree:
        return tree[key]
    for value in tree.values():
        if isinstance(value, dict) and (found := first(value, key)) is not None:
            return found
    return None


@pytest.mark.parametrize(
    "process, objective, prediction, weighting",
    [
        ("vp", "natural", "v", "uniform"),
        ("vp", "eps", "eps", "uniform"),
        ("vp", "x0", "x0", "uniform"),
        ("vp", "v", "v", "uniform"),
        ("edm", "natural", "edm", "edm"),
        ("edm", "eps", "edm", "edm"),
        ("flow", "natural", "flow", "uniform"),
        ("flow", "x0", "flow", "uniform"),
    ],
)
def test_the_objective_trains_the_process_target(process, objective, prediction, weighting):
    """vp states no target: objective=eps|x0|v choose it; edm and flow state theirs (process.prediction)."""
    obj = composed([f"process={process}", f"objective={objective}"]).objective
    assert (obj.prediction, obj.weighting) == (prediction, weighting)


def test_an_explicit_objective_value_wins_on_any_process():
    obj = composed(["process=flow", "objective.prediction=eps", "objective.weighting=min_snr"]).objective
    assert (obj.prediction, obj.weighting) == ("eps", "min_snr")
    assert composed(["process=edm", "process.prediction=v"]).objective.prediction == "v"


def test_process_files_write_only_the_process():
    """edm and flow are files of the process package; vp's file sets `process` alone (to the schedule's node)."""
    for path in sorted((CONFIG_DIR / "process").glob("*.yaml")):
        text = path.read_text()
        body = yaml.safe_load(text)
        if "@package _global_" in text:
            assert set(body) == {"process"}, path.name
        else:
            assert "_target_" in body and "objective" not in body, path.name


def test_the_default_recipe_samples_on_the_shifted_grid_with_cfg_at_low_noise():
    """The digits recipe as measured (BENCHMARKS.md section 15): heun-10 on flow's grid shifted by 0.33 (diffusers'
    FlowMatchEulerDiscreteScheduler(shift=0.33) grid) with CFG 2 inside sigma / alpha in [0.1, 2]; guidance=cfg is
    CFG at every noise level again, and experiments on other data pick it."""
    from hydra.utils import instantiate

    from difflab.diffusion.guidance import guidance_active

    cfg = composed()
    process = instantiate(cfg.process)
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=0.33)
    sched.set_timesteps(cfg.sampler.steps)
    assert (process.sampling_times(cfg.sampler.steps).float() - sched.sigmas).abs().max() <= 5e-7
    guidance = instantiate(cfg.guidance)
    times = process.sampling_times(cfg.sampler.steps)[:-1]
    guided = [guidance_active(float(t / (1 - t)) if t < 1 else float("inf"), guidance.interval) for t in times]
    assert guidance.scale == 2.0 and 0 < sum(guided) < len(guided)  # some steps guided, not all
    from difflab.diffusion.system import Diffusion

    diffusion = Diffusion(process, instantiate(cfg.objective), instantiate(cfg.sampler), sample_shape=(1, 16, 16))
    assert diffusion.describe_sampler() == "heun-10 (grid shift 0.33)"  # what the logs and metric protocols say
    assert composed(["guidance=cfg"]).guidance.interval is None
    assert composed(["experiment=stl10_vpred_cfg"]).guidance.interval is None


def test_the_default_recipe_trains_as_the_recipe_screen_chose_and_digits_text_as_it_was_measured():
    """The training settings BENCHMARKS.md section 1's recipe screen chose at equal wall-clock (batch 128, lr 2e-3, EMA
    decay 0.998, 1500 steps); digits_text, which inherits the digits experiment, keeps the settings it was measured
    with; a checkpoint that monitors a sample metric still lands where callbacks=metrics measures it."""
    cfg = composed()
    assert (cfg.datamodule.batch_size, cfg.model.lr, cfg.callbacks.ema.decay) == (128, 2e-3, 0.998)
    assert cfg.trainer.max_steps == 1500
    text = composed(["experiment=digits_text"])
    assert (text.datamodule.batch_size, text.model.lr, text.callbacks.ema.decay) == (64, 1e-3, 0.999)
    assert text.trainer.max_steps == 2000
    every = cfg.callbacks.model_checkpoint.every_n_train_steps  # checkpoints land where a monitored metric exists
    assert every % cfg.callbacks.class_grid.every_n_steps == 0
    assert every % composed(["callbacks=metrics"]).callbacks.sample_metrics.every_n_steps == 0
