"""SLURM: the launcher config (when hydra-submitit-launcher is installed), the agreed requeue signal, the requeue
hand-over after a checkpoint, and automatic resume of a requeued job."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from difflab.ops.resume import find_latest_checkpoint, resolve_resume
from difflab.ops.signals import GracefulShutdown
from difflab.ops.slurm import REQUEUE_SIGNAL, cluster_plugins
from difflab.utils.errors import CheckpointError
from tests.helpers import compose_train, tiny_overrides

torch.set_num_threads(1)


def test_slurm_launcher_config_composes_when_submitit_is_installed(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="optional extra: pip install -e '.[slurm]'")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tests.helpers import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 2)
    assert launcher["signal_delay_s"] > 0 and launcher["max_num_timeout"] > 0


def test_one_requeue_signal_everywhere(monkeypatch, tmp_path):
    cfg = compose_train(tmp_path, [])
    assert (
        GracefulShutdown(requeue_signal=cfg.callbacks.graceful_shutdown.requeue_signal).requeue_signal == REQUEUE_SIGNAL
    )
    assert REQUEUE_SIGNAL == signal.SIGUSR2  # submitit's default preemption signal (SUBMITIT_PREEMPT_SIGNAL=USR2)
    assert cluster_plugins() == []  # not on SLURM: nothing to add
    for k, v in {
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": "123",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "node1",
    }.items():
        monkeypatch.setenv(k, v)
    (env,) = cluster_plugins(REQUEUE_SIGNAL, handled_elsewhere=True)
    assert env.requeue_signal == signal.SIGUSR2 and env.auto_requeue is False  # Lightning's own handler stays off
    (env,) = cluster_plugins(REQUEUE_SIGNAL, handled_elsewhere=False)
    assert env.auto_requeue is True


class SendSignal(L.Callback):
    def __init__(self, at_step: int, sig: int):
        self.at_step, self.sig = at_step, sig

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.sig)


def test_requeue_signal_saves_checkpoint_then_hands_over_to_previous_handler(tmp_path):
    from difflab.ops.signals import find_shutdown
    from difflab.pipeline import build

    calls = []

    def submitit_like(signum, frame):  # stands in for submitit's checkpoint-and-requeue handler
        calls.append((signum, (tmp_path / "checkpoints" / "last.ckpt").is_file()))

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        cfg = compose_train(
            tmp_path,
            tiny_overrides(max_steps=50, save_every=100, extra=["logger=none", "+callbacks.class_grid.at_end=false"]),
        )
        objs = build(cfg)
        objs["trainer"].callbacks.append(SendSignal(at_step=3, sig=signal.SIGUSR2))
        objs["trainer"].fit(objs["model"], datamodule=objs["datamodule"])
        shutdown = find_shutdown(objs["trainer"])
        assert shutdown.stopped and shutdown.requeue
        assert objs["trainer"].global_step == 4  # stopped after the signalled batch
        ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
        assert ck["global_step"] == 4
        # raw and EMA weights both kept (the file was not rewritten after the EMA copy at train end)
        assert any(not torch.equal(ck["state_dict"][k], ck["current_model_state"][k]) for k in ck["state_dict"])
        assert calls == []  # not during training ...
        shutdown.after_fit(objs["trainer"])
        assert calls == [(signal.SIGUSR2, True)]  # ... but after the checkpoint was written
        assert signal.getsignal(signal.SIGUSR2) is submitit_like  # our handler is gone again
    finally:
        signal.signal(signal.SIGUSR2, previous)


def _touch(path: Path, t: float) -> Path:
    """A minimal readable checkpoint (resume skips unreadable ones) written at time ``t``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}}, path)
    os.utime(path, (t, t))
    return path


def test_resume_auto_and_requeue_pick_the_newest_checkpoint(tmp_path, monkeypatch):
    now = time.time()
    _touch(tmp_path / "checkpoints" / "step_0000010.ckpt", now - 30)
    last = _touch(tmp_path / "checkpoints" / "last.ckpt", now - 10)
    _touch(tmp_path / "checkpoints" / ".last.ckpt.abc.tmp", now)  # a write killed half-way: ignored
    assert find_latest_checkpoint(tmp_path) == last
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resolve_resume(None, None, tmp_path) is None  # a plain new run starts fresh
    assert resolve_resume(None, "auto", tmp_path) == str(last)
    assert resolve_resume(None, "never", tmp_path) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM requeued this job
    assert resolve_resume(None, None, tmp_path) == str(last)
    assert resolve_resume(None, "never", tmp_path) is None
    assert resolve_resume(None, "auto", tmp_path / "empty") is None
    assert resolve_resume("last", None, tmp_path) == str(last)
    with pytest.raises(CheckpointError, match=r"ckpt_path=last: no checkpoint at .*hydra\.run\.dir"):
        resolve_resume("last", None, tmp_path / "elsewhere")


def test_sigint_saves_checkpoint_and_stops_without_requeue(tmp_path, monkeypatch):
    from difflab.ops.signals import find_shutdown
    from difflab.pipeline import train

    before = signal.getsignal(signal.SIGINT)
    cfg = compose_train(
        tmp_path,
        tiny_overrides(max_steps=50, save_every=100, extra=["logger=none", "+callbacks.class_grid.at_end=false"]),
    )
    import difflab.pipeline as pipeline

    real_build = pipeline.build

    def build_with_sender(c):
        objs = real_build(c)
        objs["trainer"].callbacks.append(SendSignal(at_step=2, sig=signal.SIGINT))
        return objs

    monkeypatch.setattr(pipeline, "build", build_with_sender)
    objs = train(cfg)  # returns normally: train.py then exits with status 0
    assert objs["stopped_by_signal"] and not find_shutdown(objs["trainer"]).requeue
    assert objs["trainer"].global_step == 3
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert signal.getsignal(signal.SIGINT) is before
