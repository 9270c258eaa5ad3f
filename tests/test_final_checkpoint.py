"""Every run ends with its final weights in ``<run>/checkpoints/last.ckpt`` (``difflab.ops.final_checkpoint``).

- 45 steps with a checkpoint every 30: ``last.ckpt`` holds step 45, its EMA / raw weights are the in-memory final
  weights and those of the final grid, and it equals a periodic checkpoint taken at step 45 (loops, optimizer, RNG);
  resuming it with a larger ``max_steps`` continues in the same epoch;
- a resume chain (stop, resume from ``last``, stop, resume from a periodic checkpoint) ends with ``ckpt_path=last``
  at the true last step, no ``last-v*.ckpt``, and, at epoch boundaries, the uninterrupted run's exact weights;
- resuming from the first periodic checkpoint of a plain-``ModelCheckpoint`` run: Lightning writes ``last-v1.ckpt``
  (negative control), ``RunCheckpoint`` keeps ``last.ckpt``;
- ``max_time``, ``EarlyStopping`` and ``max_epochs`` endings; SIGTERM's checkpoint is not written twice; the
  ``on_train_end`` fallback keeps EMA in ``state_dict`` and raw weights in ``current_model_state``;
- the private Lightning API the module relies on is still there (pinned lightning 2.6).
"""

from __future__ import annotations

import inspect
import shutil
import signal
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from difflab.callbacks.ema import find_ema
from difflab.checkpoints import load_checkpoint, module_from_checkpoint
from difflab.ops.final_checkpoint import RunCheckpoint
from difflab.ops.resume import resolve_resume
from difflab.pipeline import build
from tests.helpers import compose_train, tiny_overrides

torch.set_num_threads(1)  # 2 shared cores: one thread per process

QUIET = ["callbacks.class_grid.every_n_steps=100000", "logger=none", "trainer.deterministic=true"]
NO_GRID_AT_END = ["+callbacks.class_grid.at_end=false"]


class StopAt(L.Callback):
    """Sets ``trainer.should_stop`` after optimizer step ``step``: what EarlyStopping, Timer or a signal do."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class Probe(L.Callback):
    """Counts checkpoint dumps per global step and records the first batch each fit trains on."""

    def __init__(self):
        self.saves: Counter = Counter()
        self.first_batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_batch is None:
            self.first_batch = (trainer.current_epoch, batch_idx, trainer.global_step)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saves[trainer.global_step] += 1


def _cfg(out: Path, max_steps: int, save_every: int, extra=(), grid_at_end: bool = False):
    return compose_train(
        out,
        tiny_overrides(
            max_steps=max_steps, save_every=save_every, extra=[*QUIET, *([] if grid_at_end else NO_GRID_AT_END), *extra]
        ),
    )


def _fit(out: Path, max_steps: int, save_every: int, extra=(), callbacks=(), grid_at_end: bool = False) -> dict:
    """``difflab.pipeline.train`` minus the logging extras, with test callbacks added; ``ckpt_path=last`` resolves
    exactly as ``train.py`` resolves it."""
    cfg = _cfg(out, max_steps, save_every, extra, grid_at_end)
    ckpt = resolve_resume(cfg.get("ckpt_path"), cfg.get("resume"), out)
    objs = build(cfg)
    probe = Probe()
    # in front: the Trainer moved checkpoint callbacks to the end when it was built, as it does with configured ones
    objs["trainer"].callbacks[:0] = [*callbacks, probe]
    objs["trainer"].fit(objs["model"], datamodule=objs["datamodule"], ckpt_path=ckpt, weights_only=True)
    objs["probe"] = probe
    return objs


def _names(out: Path) -> set[str]:
    return {p.name for p in (out / "checkpoints").glob("*.ckpt")}


def _step(path: Path) -> int:
    return int(load_checkpoint(path)["global_step"])


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def _equal(a, b) -> bool:
    """Deep equality of checkpoint entries (tensors exactly; NaN equals NaN: RNGState stores a missing gauss as NaN)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return (
            torch.is_tensor(b)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(((a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b).all())
        )
    return a == b


@pytest.fixture(scope="module")
def steps_per_epoch(tmp_path_factory) -> int:
    """Batches per epoch of the tiny digits train split (drop_last), from the datamodule itself."""
    cfg = _cfg(tmp_path_factory.mktemp("dm"), 1, 1)
    dm = instantiate(cfg.datamodule)
    dm.prepare_data()
    dm.setup("fit")
    return len(dm.train_dataloader())


# ---------------------------------------------------------------------------------------------- (a) final step
def test_last_ckpt_holds_final_step_like_a_periodic_checkpoint(tmp_path, steps_per_epoch):
    run = tmp_path / "run"
    objs = _fit(run, 45, 30, extra=["callbacks.class_grid.judge=none"], grid_at_end=True)
    trainer, model = objs["trainer"], objs["model"]
    assert trainer.global_step == 45
    assert _names(run) == {"step_0000030.ckpt", "last.ckpt"}  # no step file outside the every-30 series
    assert trainer.checkpoint_callback.final_checkpoint["at"] == "the last training batch"
    assert objs["probe"].saves[45] == 1
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 45

    # the in-memory final weights: EMA (swapped into the model at train end) and the raw weights EMA kept aside
    ema = find_ema(trainer)
    assert ema.swapped
    assert _max_diff(last["state_dict"], {k: v.cpu() for k, v in model.state_dict().items()}) == 0.0
    assert _max_diff(last["current_model_state"], {k: v.cpu() for k, v in ema._raw_state_at_end.items()}) == 0.0
    assert _max_diff(last["state_dict"], last["current_model_state"]) > 1e-5  # EMA is a real average

    # the final grid was sampled from exactly these EMA weights: re-render it from last.ckpt
    from PIL import Image

    from difflab.diagnostics.class_grid import render_grid

    final_grid = run / "figures" / "class_grid" / "final.png"
    again = render_grid(
        module_from_checkpoint(run / "checkpoints" / "last.ckpt"), tmp_path / "again.png", n_cols=2, seed=0
    )
    assert np.array_equal(np.asarray(Image.open(final_grid)), np.asarray(Image.open(again)))

    # the same run checkpointing every 15 steps has a periodic checkpoint at 45: the final one is that checkpoint
    periodic = load_checkpoint(
        _fit(tmp_path / "every15", 45, 15)["trainer"].checkpoint_callback.dirpath + "/step_0000045.ckpt"
    )
    for key in (
        "global_step",
        "epoch",
        "loops",
        "optimizer_states",
        "lr_schedulers",
        "state_dict",
        "current_model_state",
        "averaging_state",
    ):
        assert _equal(last[key], periodic[key]), key
    others = [k for k in last["callbacks"] if not k.startswith(("ModelCheckpoint", "Timer"))]  # paths, wall-clock
    assert "RNGState" in others and "EMA" in others
    for key in others:
        assert _equal(last["callbacks"][key], periodic["callbacks"][key]), key

    # resume it with a larger budget: same epoch, next batch, counters continue
    resumed = _fit(run, 50, 30, extra=["ckpt_path=last"])
    assert resumed["probe"].first_batch == (45 // steps_per_epoch, 45 % steps_per_epoch, 45)
    assert resumed["trainer"].global_step == 50
    assert _names(run) == {"step_0000030.ckpt", "last.ckpt"}
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 50 and last["callbacks"]["EMA"]["num_updates"] == 50
    assert all(s["step"] == 50 for s in last["optimizer_states"][0]["state"].values())


# ---------------------------------------------------------------------------------------------- (b, c) resume chain
def test_resume_chain_ends_at_true_last_step_and_matches_uninterrupted_run(tmp_path, steps_per_epoch):
    """Checkpoint every 2 epochs; stop at epoch 3 (final save), resume from ``last``, stop mid-epoch 5, resume from the
    periodic checkpoint of epoch 4 (not ``last``), finish at epoch 5. Same ``max_steps`` throughout (the LR schedule
    spans it), stops by ``trainer.should_stop``."""
    e = steps_per_epoch
    every, total = 2 * e, 5 * e
    stop1, stop2, periodic = 3 * e, 4 * e + e // 2, 4 * e
    uninterrupted = tmp_path / "uninterrupted"
    _fit(uninterrupted, total, every)
    assert _step(uninterrupted / "checkpoints" / "last.ckpt") == total

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    _fit(run, total, every, callbacks=[StopAt(stop1)])
    assert _step(ckpts / "last.ckpt") == stop1  # the final step, not the periodic 2e
    second = _fit(run, total, every, extra=["ckpt_path=last"], callbacks=[StopAt(stop2)])
    assert second["probe"].first_batch[2] == stop1
    assert _step(ckpts / "last.ckpt") == stop2
    third = _fit(run, total, every, extra=[f"ckpt_path={ckpts / f'step_{periodic:07d}.ckpt'}"])
    assert third["probe"].first_batch[2] == periodic

    resolved = Path(resolve_resume("last", None, run))
    assert resolved == ckpts / "last.ckpt" and _step(resolved) == total
    assert _names(run) == {f"step_{every:07d}.ckpt", f"step_{2 * every:07d}.ckpt", "last.ckpt"}  # no *-v1.ckpt

    a = load_checkpoint(uninterrupted / "checkpoints" / "last.ckpt")
    b = load_checkpoint(resolved)
    raw = _max_diff(a["current_model_state"], b["current_model_state"])
    ema = _max_diff(a["state_dict"], b["state_dict"])
    print(f"chain {stop1}->{stop2}, resumed at {periodic} -> {total}: max |raw diff| {raw:.3g}, |EMA diff| {ema:.3g}")
    assert raw <= 1e-6 and ema <= 1e-6
    assert _max_diff(b["state_dict"], b["current_model_state"]) > 1e-5


def test_resume_from_first_periodic_checkpoint_of_plain_modelcheckpoint_run(tmp_path):
    """The checkpoint written before a run's first ``last.ckpt`` stores ``last_model_path=''``: Lightning then writes
    ``last-v1.ckpt`` (and ``ckpt_path=last`` stays at step 30); ``RunCheckpoint`` overwrites ``last.ckpt``."""
    plain = ["callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint"]
    run = tmp_path / "run"
    _fit(run, 30, 30, extra=plain)
    first = run / "checkpoints" / "step_0000030.ckpt"
    state = next(v for k, v in load_checkpoint(first)["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert state["last_model_path"] == ""
    control = tmp_path / "control"
    shutil.copytree(run, control)

    _fit(control, 45, 30, extra=[*plain, f"ckpt_path={control / 'checkpoints' / 'step_0000030.ckpt'}"])
    assert "last-v1.ckpt" in _names(control)  # Lightning's behaviour: the new last is versioned ...
    assert _step(control / "checkpoints" / "last.ckpt") == 30  # ... and ckpt_path=last resumes stale weights

    objs = _fit(run, 45, 30, extra=[f"ckpt_path={first}"])
    assert _names(run) == {"step_0000030.ckpt", "last.ckpt"}
    assert _step(run / "checkpoints" / "last.ckpt") == 45
    # same state key as ModelCheckpoint: the plain run's callback state was restored into RunCheckpoint
    assert objs["trainer"].checkpoint_callback.best_model_path == str(first)


# ---------------------------------------------------------------------------------------------- (d) other endings
class FakeClock:
    """``time`` for Lightning's Timer: real monotonic time plus a jump (``shift``) a test can add."""

    def __init__(self):
        import time

        self._time, self.shift = time, 0.0

    def monotonic(self) -> float:
        return self._time.monotonic() + self.shift


class JumpClock(L.Callback):
    def __init__(self, clock: FakeClock, at_step: int):
        self.clock, self.at_step = clock, at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.at_step:  # the batch that makes step `at_step`
            self.clock.shift = 1e6


@pytest.mark.parametrize("ending", ["max_time", "early_stopping", "max_epochs"])
def test_max_time_early_stopping_and_max_epochs_end_with_last_at_final_step(tmp_path, monkeypatch, ending):
    """``max_time`` (Lightning's Timer sets should_stop in on_train_batch_end) and ``max_epochs`` are saved at the last
    batch; ``EarlyStopping`` decides at validation end, so the final checkpoint is written there: two code paths."""
    callbacks, extra, steps, every = [], [], 100, 5
    if ending == "max_time":
        import lightning.pytorch.callbacks.timer as timer_module

        clock = FakeClock()
        monkeypatch.setattr(timer_module, "time", clock)
        extra, callbacks = ["trainer.max_time='00:00:10:00'"], [JumpClock(clock, 7)]
        final, at = 7, "the last training batch"
    elif ending == "early_stopping":
        extra = [
            "trainer.val_check_interval=7",
            "+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping",
            "+callbacks.early_stopping.monitor=val/loss",
            "+callbacks.early_stopping.mode=min",
            "+callbacks.early_stopping.stopping_threshold=1e9",
        ]  # stops at the first validation
        final, at = 7, "validation end"
    else:
        extra, steps, every = ["trainer.max_epochs=2", "trainer.limit_train_batches=4"], -1, 3  # 2 epochs of 4
        final, at = 8, "the last training batch"
    objs = _fit(tmp_path, steps, every, extra=extra, callbacks=callbacks)
    trainer = objs["trainer"]
    assert trainer.global_step == final
    assert _step(tmp_path / "checkpoints" / "last.ckpt") == final
    assert trainer.checkpoint_callback.final_checkpoint == {
        "path": str(tmp_path / "checkpoints" / "last.ckpt"),
        "step": final,
        "at": at,
    }
    assert objs["probe"].saves[final] == 1
    assert not [n for n in _names(tmp_path) if n.startswith("last-")]


def test_sigterm_checkpoint_is_not_written_twice(tmp_path):
    class Signal(L.Callback):  # what GracefulShutdown's signal handler does, without a real signal
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step + 1 == 7:
                from difflab.ops.signals import find_shutdown

                find_shutdown(trainer).received = signal.SIGTERM

    objs = _fit(tmp_path, 100, 5, callbacks=[Signal()])
    assert objs["trainer"].global_step == 7
    assert _step(tmp_path / "checkpoints" / "last.ckpt") == 7
    assert objs["probe"].saves[7] == 1  # GracefulShutdown's save only
    assert objs["trainer"].checkpoint_callback.final_checkpoint is None


def test_train_end_fallback_keeps_ema_and_raw_layout(tmp_path):
    """Forced to the last resort (``on_train_end``, after EMA swapped its weights into the model), the final
    checkpoint still has EMA weights in ``state_dict`` and the raw ones in ``current_model_state``."""
    cfg = _cfg(tmp_path, 100, 5)
    objs = build(cfg)
    trainer, model = objs["trainer"], objs["model"]
    cb = trainer.checkpoint_callback
    assert isinstance(cb, RunCheckpoint)
    save_final = cb.save_final
    cb.save_final = lambda tr, at: save_final(tr, at) if at == "train end" else None
    trainer.callbacks.insert(0, StopAt(7))
    trainer.fit(model, datamodule=objs["datamodule"])
    assert cb.final_checkpoint["at"] == "train end" and cb.final_checkpoint["step"] == 7
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    ema = find_ema(trainer)
    assert ck["global_step"] == 7 and ema.swapped
    assert _max_diff(ck["state_dict"], {k: v.cpu() for k, v in model.state_dict().items()}) == 0.0
    assert _max_diff(ck["current_model_state"], {k: v.cpu() for k, v in ema._raw_state_at_end.items()}) == 0.0
    assert _max_diff(ck["state_dict"], ck["current_model_state"]) > 1e-5


# ---------------------------------------------------------------------------------------------- pinned private API
def test_lightning_private_api_used_by_run_checkpoint():
    """``RunCheckpoint`` reads ``_last_global_step_saved``, writes ``_last_checkpoint_saved`` and relies on
    ``_save_last_checkpoint`` not versioning the file named by ``last_model_path`` (Lightning#11451). If this fails
    after a Lightning upgrade, re-check src/ops/final_checkpoint.py against the new model_checkpoint.py."""
    import lightning
    from lightning.pytorch.callbacks import ModelCheckpoint

    assert lightning.__version__.startswith("2.6."), lightning.__version__
    cb = ModelCheckpoint()
    assert cb._last_global_step_saved == 0 and cb._last_checkpoint_saved == "" and cb.last_model_path == ""
    save = inspect.getsource(ModelCheckpoint._save_checkpoint)
    assert "self._last_global_step_saved = trainer.global_step" in save
    assert "self._last_checkpoint_saved = filepath" in save
    last = inspect.getsource(ModelCheckpoint._save_last_checkpoint)
    assert "filepath != self.last_model_path" in last and "self._save_checkpoint(trainer, filepath)" in last
    assert "self._last_checkpoint_saved" in inspect.getsource(ModelCheckpoint.on_train_end)

    # takes every ModelCheckpoint argument, keeps its state key
    kwargs = dict(
        dirpath="/tmp/x",
        filename="step_{step:07d}",
        monitor="val/loss",
        mode="max",
        save_top_k=2,
        save_last="link",
        every_n_train_steps=5,
        auto_insert_metric_name=False,
        save_on_exception=True,
        save_on_train_epoch_end=False,
        enable_version_counter=False,
        verbose=True,
        save_weights_only=False,
    )
    assert RunCheckpoint(**kwargs).state_key == ModelCheckpoint(**kwargs).state_key
    assert set(inspect.signature(ModelCheckpoint.__init__).parameters) - {"self"} == set(kwargs) | {
        "train_time_interval",
        "every_n_epochs",
    }


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_cpu_final_checkpoint_and_resume_from_first_periodic(tmp_path):
    """Two gloo ranks (~70 s on 2 cores): the final save and the fixed ``last`` path are collectives that must not
    hang; 5 steps every 2 end with last.ckpt at 5; resuming from step 2 to 7 keeps last.ckpt (no last-v1.ckpt)."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "HYDRA_FULL_ERROR": "1",
    }
    run = tmp_path / "run"

    def train_py(max_steps: int, *extra: str) -> None:
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            *tiny_overrides(max_steps=max_steps, save_every=2),
            *QUIET,
            *NO_GRID_AT_END,
            "trainer=ddp_cpu",
            f"hydra.run.dir={run}",
            *extra,
        ]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]

    train_py(5)
    assert _names(run) == {"step_0000002.ckpt", "step_0000004.ckpt", "last.ckpt"}
    assert _step(run / "checkpoints" / "last.ckpt") == 5
    train_py(7, f"ckpt_path={run / 'checkpoints' / 'step_0000002.ckpt'}")
    assert not [n for n in _names(run) if n.startswith("last-")]
    assert _step(run / "checkpoints" / "last.ckpt") == 7
    assert "step_0000004-v1.ckpt" in _names(run)  # periodic names keep Lightning's version counter
