"""The log names the bound that ended a training run (max_steps, max_time, max_epochs, early stopping, a signal)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, Timer
from lightning.pytorch.demos.boring_classes import BoringModel

from difflab.ops.signals import GracefulShutdown
from difflab.run_bounds import stopping_bound


class SpentTimer(Timer):
    """A Timer whose budget is used up."""

    def time_elapsed(self, stage="train"):
        return 360.0

    def time_remaining(self, stage="train"):
        return 0.0


def trainer_at(step=120, max_steps=2000, max_epochs=-1, epoch=3, callbacks=(), interrupted=False):
    return SimpleNamespace(
        global_step=step,
        max_steps=max_steps,
        max_epochs=max_epochs,
        current_epoch=epoch,
        callbacks=list(callbacks),
        interrupted=interrupted,
    )


def test_each_bound_is_named():
    assert stopping_bound(trainer_at(step=2000)) == "max_steps (2000 of 2000 steps)"
    assert stopping_bound(trainer_at(callbacks=[SpentTimer()])) == "max_time (360 s; step 120 of 2000)"
    assert stopping_bound(trainer_at(max_steps=-1, max_epochs=3)) == "max_epochs (3 epochs, step 120)"
    shutdown = GracefulShutdown()
    shutdown.stopped, shutdown.received = True, signal.SIGTERM
    assert stopping_bound(trainer_at(callbacks=[shutdown, SpentTimer()])) == "a signal (SIGTERM, step 120)"
    assert stopping_bound(trainer_at(interrupted=True)).startswith("a signal (interrupt")
    assert "no configured bound" in stopping_bound(trainer_at())


class Plateau(BoringModel):
    """A model whose validation loss never improves."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.tensor(1.0))


@pytest.mark.parametrize(
    "kwargs, model, expected",
    [
        (dict(max_epochs=-1, max_steps=3), BoringModel, "max_steps (3 of 3 steps)"),
        (dict(max_epochs=2, max_steps=-1, limit_train_batches=2), BoringModel, "max_epochs (2 epochs, step 4)"),
        (
            dict(max_epochs=-1, max_steps=-1, limit_train_batches=2, callbacks=[EarlyStopping("val_loss", patience=1)]),
            Plateau,
            "early stopping on val_loss",
        ),
    ],
)
def test_a_real_fit_reports_its_bound(tmp_path, kwargs, model, expected):
    fit = L.Trainer(
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        **kwargs,
    )
    fit.fit(model())
    assert stopping_bound(fit).startswith(expected)


def test_a_training_run_logs_the_bound(tmp_path):
    """train.py's log (stderr and <run>/train.log) ends fit with the line naming the bound."""
    run = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parents[1] / "train.py"),
            "debug=fast",
            "callbacks=none",
            "datamodule.image_size=8",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training stopped by max_steps (4 of 4 steps)" in (run / "train.log").read_text()
