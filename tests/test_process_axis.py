"""The formulation as a config axis: `-m process=vp,edm,flow` from the command line, one job per process with the
same denoiser and data; undefined sampler / process pairs refused before anything is written; the process's settings
reach the model; a time-budgeted run's learning rate follows the wall-clock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from difflab.optim.lr_schedules import time_progress, warmup_cosine, warmup_cosine_progress
from tests.helpers import compose_train, tiny_overrides

FAST = [
    "debug=fast",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "datamodule.image_size=8",
    "model.net.base_channels=8",
    "model.net.channel_mults=[1,2]",
    "model.net.attention_levels=[]",
    "model.net.groups=4",
    "sampler.steps=2",
]


def run_train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "difflab.train", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )


def test_multirun_over_processes_trains_one_job_each(tmp_path):
    r = run_train(tmp_path, "-m", "process=vp,edm,flow", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = next((tmp_path / "logs" / "train" / "multiruns").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1", "2"]
    targets = set()
    for job in jobs:
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        cfg = ckpt["difflab"]["config"]
        d = cfg["model"]["diffusion"]
        targets.add((d["process"]["_target_"].rsplit(".", 1)[-1], d["objective"]["prediction"]))
        assert cfg["model"]["net"]["base_channels"] == 8  # the same denoiser in every job
    assert targets == {("VPProcess", "v"), ("EDMProcess", "edm"), ("FlowProcess", "flow")}


@pytest.mark.parametrize(
    "args, names",
    [
        (["process=edm", "sampler=ddpm"], "sampler=ddpm needs a discrete process (vp)"),
        (["process=vp", "sampler=heun", "sampler.s_churn=10"], "sampler.s_churn > 0 needs a continuous process"),
    ],
)
def test_undefined_sampler_process_pairs_fail_at_start_and_write_nothing(tmp_path, args, names):
    r = run_train(tmp_path, *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and names in lines[0]
    assert "Traceback" not in r.stderr and not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "process, cls, prediction, weighting",
    [
        ("vp", "VPProcess", "v", "uniform"),
        ("edm", "EDMProcess", "edm", "edm"),
        ("flow", "FlowProcess", "flow", "uniform"),
    ],
)
def test_each_process_config_builds_its_module(tmp_path, process, cls, prediction, weighting):
    from hydra.utils import instantiate

    from difflab.pipeline import fill_from_datamodule

    cfg = compose_train(tmp_path, tiny_overrides(extra=[f"process={process}"]))
    fill_from_datamodule(cfg, SimpleNamespace(sample_shape=(1, 8, 8), num_classes=10, class_names=None, prompts=None))
    module = instantiate(cfg.model)
    assert type(module.diffusion.process).__name__ == cls
    assert (module.diffusion.objective.prediction, module.diffusion.objective.weighting) == (prediction, weighting)
    x = module.diffusion.sample(module, 4, torch.arange(4), noise=torch.randn(4, 1, 8, 8))
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


class FakeTimer:
    """Lightning's Timer interface: time used and left of the training budget."""

    def __init__(self, budget: float):
        self.budget, self.elapsed = budget, 0.0

    def time_elapsed(self, stage):
        return self.elapsed

    def time_remaining(self, stage):
        return self.budget - self.elapsed


def test_time_budget_schedule_follows_the_wall_clock():
    timer = FakeTimer(100.0)
    progress = time_progress(timer)
    got = []
    for t in (0.0, 2.5, 5.0, 52.5, 100.0):
        timer.elapsed = t
        got.append(warmup_cosine_progress(progress(), 0.05, 0.01, 0.1))
    assert got == pytest.approx([0.01, 0.01 + 0.99 * 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1])
    # the step budget is the same function of step / max_steps
    assert warmup_cosine(50, 10, 100) == pytest.approx(warmup_cosine_progress(0.5, 0.1))


def test_time_budget_needs_a_fractional_warmup(tmp_path):
    from difflab.pipeline import train
    from difflab.utils.errors import ConfigError

    cfg = compose_train(
        tmp_path,
        tiny_overrides(
            extra=["logger=none", "trainer.max_steps=-1", "++trainer.max_time=00:00:00:05", "lr_schedule.warmup=10"]
        ),
    )
    with pytest.raises(ConfigError, match="fraction of the budget"):
        train(cfg)
