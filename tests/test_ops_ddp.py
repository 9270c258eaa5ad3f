"""DDP + Hydra multirun (Lightning#11300 fix) and W&B naming; the end-to-end 2-job ddp_cpu sweep is marked slow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from difflab.ops import ddp_multirun
from difflab.ops import wandb as wandb_ops
from tests.helpers import ROOT, compose_train, tiny_overrides

torch.set_num_threads(1)


def test_fix_is_installed_in_both_lightning_launchers():
    import importlib

    import lightning

    assert lightning.__version__.startswith("2.6."), "the fix patches private API: re-check it when lightning moves"
    ddp_multirun.install()
    assert ddp_multirun.is_installed()
    for name in (
        "lightning.fabric.strategies.launchers.subprocess_script",
        "lightning.pytorch.strategies.launchers.subprocess_script",
    ):
        mod = importlib.import_module(name)
        assert mod._hydra_subprocess_cmd is ddp_multirun._child_command_hook
    # the pytorch launcher looks the name up at call time, so the patched builder is the one it uses
    src = importlib.import_module("lightning.pytorch.strategies.launchers.subprocess_script")
    import inspect

    assert "_hydra_subprocess_cmd(local_rank)" in inspect.getsource(
        src._SubprocessScriptLauncher._call_children_scripts
    )


def test_child_command_runs_only_the_current_sweep_job(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    job_dir = tmp_path / "multiruns" / "2026-01-01_00-00-00" / "1 a=b,c"  # characters Hydra's grammar needs quoted
    compose_train(job_dir, ["trainer=ddp_cpu", "model.lr=0.0002"])
    name = HydraConfig.get().job.name
    monkeypatch.setattr(
        sys, "argv", ["train.py", "-m", "--config-name", "train", "trainer=ddp_cpu", "model.lr=1e-4,2e-4"]
    )
    monkeypatch.setattr(ddp_multirun, "script_command", lambda: ["python", "train.py"])
    cmd, cwd = ddp_multirun.child_command(local_rank=1)
    assert cmd[:4] == ["python", "train.py", "--config-name", "train"]
    assert "-m" not in cmd and "--multirun" not in cmd and not any("1e-4,2e-4" in c for c in cmd)
    assert "trainer=ddp_cpu" in cmd and "model.lr=0.0002" in cmd
    assert "hydra.output_subdir=null" in cmd and f"hydra.job.name={name}_rank1" in cmd
    run_dir = next(c for c in cmd if c.startswith("hydra.run.dir="))
    parsed = OverridesParser.create().parse_override(run_dir)
    assert parsed.value() == str(job_dir)  # survives Hydra's override grammar
    assert Path(cwd).is_dir()


def test_config_flags_are_forwarded_in_both_spellings():
    argv = ["-m", "-cn", "train", "--config-dir=/x/cfg", "a=1", "--config-path", "configs"]
    assert ddp_multirun._config_flags(argv) == ["-cn", "train", "--config-dir=/x/cfg", "--config-path", "configs"]


def test_end_job_waits_for_children_and_clears_launcher_environment(monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    for var in ddp_multirun.LAUNCHER_ENV_VARS:
        monkeypatch.setenv(var, "1")
    trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[child])))
    ddp_multirun.end_job(trainer)
    assert child.returncode == 0
    assert not any(v in os.environ for v in ddp_multirun.LAUNCHER_ENV_VARS)
    # a process that launched nothing (e.g. started by torchrun) keeps its environment
    monkeypatch.setenv("LOCAL_RANK", "3")
    ddp_multirun.end_job(SimpleNamespace(strategy=SimpleNamespace(launcher=None)))
    assert os.environ["LOCAL_RANK"] == "3"


# ---------------------------------------------------------------------------------------------- W&B naming and ids
def test_wandb_names_groups_and_persistent_run_id(tmp_path, monkeypatch):
    monkeypatch.setattr(wandb_ops, "_hydra_info", lambda: {"experiment": "digits", "multirun": False})
    assert wandb_ops.run_names(None, None) == ("digits", "digits")
    assert wandb_ops.run_names("mine", "g") == ("mine", "g")
    monkeypatch.setattr(
        wandb_ops,
        "_hydra_info",
        lambda: {
            "experiment": "digits",
            "multirun": True,
            "sweep": "2026-01-01_10-00-00",
            "job_num": 1,
            "swept": {"model.lr"},
            "job_overrides": "model.lr=0.0002",
        },
    )
    assert wandb_ops.run_names(None, None) == ("digits/model.lr=0.0002", "digits-sweep-2026-01-01_10-00-00")
    assert wandb_ops.swept_keys(["-m", "model.lr=1e-4,2e-4", "experiment=glob(*)", "trainer=ddp_cpu"]) == {
        "model.lr",
        "experiment",
    }

    rid = wandb_ops.run_id(tmp_path)
    assert re.fullmatch(r"[a-z0-9]{8}", rid)
    assert wandb_ops.run_id(tmp_path) == rid == (tmp_path / "wandb_run_id.txt").read_text().strip()  # resume: same id
    assert wandb_ops.run_id(tmp_path / "other") != rid


# ---------------------------------------------------------------------------------------------- end to end
def _strings(path: Path) -> str:
    """Printable runs of a binary file (the offline .wandb log stores run name and group as plain strings)."""
    return "\n".join(m.decode() for m in re.findall(rb"[ -~]{6,}", path.read_bytes()))


@pytest.mark.slow
def test_ddp_cpu_sweep_runs_each_job_once_in_its_own_dir_with_synced_ema_and_wandb_runs(tmp_path):
    sweep = tmp_path / "sweep"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HYDRA_FULL_ERROR": "1",
    }
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        *tiny_overrides(max_steps=4, save_every=2),
        "trainer=ddp_cpu",
        "logger=wandb",
        "model.lr=1e-4,2e-4",
        f"hydra.sweep.dir={sweep}",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    # each job ran exactly once, both ranks of it, and nothing else was started
    assert out.count("Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2") == 2
    assert out.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 2
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    run_ids = set()
    for job, lr in (("0", 1e-4), ("1", 2e-4)):
        d = sweep / job
        # rank 0 writes one checkpoint and one grid per save; rank 1 logged into the same job directory
        assert sorted(p.name for p in (d / "checkpoints").iterdir()) == [
            "last.ckpt",
            "step_0000002.ckpt",
            "step_0000004.ckpt",
        ]
        assert sorted(p.name for p in (d / "figures" / "class_grid").iterdir()) == [
            "final.png",
            "step_0000002.png",
            "step_0000004.png",
        ]
        assert (d / "train_rank1.log").is_file()
        ck = torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)
        assert ck["global_step"] == 4 and ck["difflab"]["config"]["model"]["lr"] == lr
        assert ck["difflab"]["config"]["trainer"]["devices"] == 2
        # raw and EMA weights identical on both ranks (fingerprints gathered at the last step)
        report = json.loads((d / "ddp_check.json").read_text())[-1]
        assert report["step"] == 4 and report["world_size"] == 2
        assert report["raw"]["equal"] and report["ema"]["equal"]
        assert report["raw"]["rank_checksums"][0] != report["ema"]["rank_checksums"][0]  # EMA is not a copy
        # one offline W&B run per job, id kept in the run directory, named after the experiment and the sweep
        runs = list((d / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        rid = (d / "wandb_run_id.txt").read_text().strip()
        assert runs[0].name.endswith(rid)
        run_ids.add(rid)
        strings = _strings(next(runs[0].glob("*.wandb")))
        assert f"digits-sweep-{sweep.name}" in strings and f"digits/model.lr={lr}" in strings
    assert len(run_ids) == 2
