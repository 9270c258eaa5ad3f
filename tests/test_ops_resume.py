"""Resume, fine-tuning and fault handling of real (tiny) training runs.

- exact resume: from an epoch-boundary checkpoint, N more steps give the same raw and EMA weights as the
  uninterrupted run (and without RNG restore they do not: the RNG state matters);
- kill -9 mid-run, resume with ``ckpt_path``: step, LR, optimizer and EMA continue from the checkpoint;
- SIGTERM: a checkpoint appears and ``train.py`` exits with status 0;
- ``init_from``: weights + EMA loaded, fresh optimizer/schedule; strict errors list keys, non-strict prints a table;
- NaN guard: injected non-finite loss / gradients skip the step (weights untouched), are counted, and K in a row
  stop training with a message naming the step and the last good checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from difflab.checkpoints import load_checkpoint
from difflab.optim.lr_schedules import resolve_steps, warmup_cosine
from difflab.pipeline import build, train
from tests.helpers import ROOT, compose_train, tiny_overrides

torch.set_num_threads(1)  # 2 shared cores: one thread per process is ~10x faster than two contending ones

STEPS_PER_EPOCH = 25  # 1617 training digits // batch 64 (drop_last)
# budget=steps: the LR is the closed form of the step (the default also follows max_time when it is further along)
QUIET = ["callbacks.class_grid.every_n_steps=100000", "+callbacks.class_grid.at_end=false", "lr_schedule.budget=steps"]
NOLOG = ["logger=none"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def _run(out: Path, max_steps: int, save_every: int, extra=(), probe: L.Callback | None = None) -> dict:
    cfg = compose_train(
        out,
        tiny_overrides(
            max_steps=max_steps, save_every=save_every, extra=[*QUIET, *NOLOG, "trainer.deterministic=true", *extra]
        ),
    )
    if probe is None:
        return train(cfg)
    objs = build(cfg)
    objs["trainer"].callbacks.append(probe)
    objs["trainer"].fit(objs["model"], datamodule=objs["datamodule"], ckpt_path=cfg.get("ckpt_path"))
    return objs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """30 steps (1.2 epochs), a checkpoint every 5 steps: step 25 is the epoch boundary."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(out, max_steps=30, save_every=5)
    return out


def test_resume_from_epoch_boundary_matches_uninterrupted_run(uninterrupted, tmp_path):
    boundary = uninterrupted / "checkpoints" / f"step_{STEPS_PER_EPOCH:07d}.ckpt"
    ck = load_checkpoint(boundary)
    assert ck["global_step"] == STEPS_PER_EPOCH and ck["epoch"] == 0
    resumed = tmp_path / "resumed"
    _run(resumed, max_steps=30, save_every=5, extra=[f"ckpt_path={boundary}"])
    a = load_checkpoint(uninterrupted / "checkpoints" / "step_0000030.ckpt")
    b = load_checkpoint(resumed / "checkpoints" / "step_0000030.ckpt")
    assert a["global_step"] == b["global_step"] == 30
    raw_diff = _max_diff(a["current_model_state"], b["current_model_state"])
    ema_diff = _max_diff(a["state_dict"], b["state_dict"])
    print(
        f"exact resume after {30 - STEPS_PER_EPOCH} steps: max |raw diff| {raw_diff:.3g}, max |EMA diff| {ema_diff:.3g}"
    )
    assert raw_diff <= 1e-6 and ema_diff <= 1e-6
    # the EMA is a real average, not a copy of the raw weights
    assert _max_diff(a["state_dict"], a["current_model_state"]) > 1e-5

    # negative control: without restoring RNG states the resumed run draws other noise and diverges
    no_rng = tmp_path / "no_rng"
    _run(no_rng, max_steps=30, save_every=5, extra=[f"ckpt_path={boundary}", "~callbacks.rng_state"])
    c = load_checkpoint(no_rng / "checkpoints" / "step_0000030.ckpt")
    assert _max_diff(a["current_model_state"], c["current_model_state"]) > 1e-5


class ResumeProbe(L.Callback):
    """Records what the trainer holds when training (re)starts, then stops after ``n_steps`` more steps."""

    def __init__(self, n_steps: int = 2):
        self.n_steps, self.start = n_steps, None

    def on_train_start(self, trainer, pl_module):
        from difflab.callbacks.ema import find_ema

        ema = find_ema(trainer)
        opt = trainer.optimizers[0]
        first = next(iter(pl_module.parameters()))
        self.start = {
            "step": trainer.global_step,
            "lr": opt.param_groups[0]["lr"],
            "raw": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "ema": {k: v.detach().clone() for k, v in ema._average_model.module.state_dict().items()},
            "ema_updates": ema.num_updates,
            "adam_step": float(opt.state[first].get("step", 0)),
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.start["step"] + self.n_steps:
            trainer.should_stop = True


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
        "WANDB_MODE": "disabled",
    }


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """Start a training process writing stdout+stderr to ``log`` (a file: a full pipe would block the child)."""
    return subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait_for(pred, proc: subprocess.Popen, timeout: float, what: str, log: Path):
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = pred()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def _steps(ckpt_dir: Path, newer_than: float = 0.0) -> list[int]:
    """Steps of the step_*.ckpt files written after `newer_than`; Lightning names a repeat "step_0000015-v1"."""
    return sorted(
        int(re.match(r"step_(\d+)", p.stem).group(1))
        for p in ckpt_dir.glob("step_*.ckpt")
        if p.stat().st_mtime > newer_than
    )


def test_kill9_resume_continues_step_lr_ema_then_sigterm_saves_and_exits_0(tmp_path):
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        *tiny_overrides(max_steps=100000, save_every=5, extra=QUIET),
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    ]
    # 1) a long run, SIGKILLed once it has written the step-10 checkpoint
    p1 = _start(args, tmp_path / "p1.log")
    _wait_for(
        lambda: (ckpt_dir / "step_0000010.ckpt").is_file(), p1, 400, "the step-10 checkpoint", tmp_path / "p1.log"
    )
    p1.send_signal(signal.SIGKILL)
    p1.wait()
    last = load_checkpoint(ckpt_dir / "last.ckpt")  # still loads after kill -9 (atomic writes)
    s1 = last["global_step"]
    assert s1 >= 5 and s1 % 5 == 0  # step 10, or step 5 if the kill landed between step_10 and last.ckpt

    # 2) resume in-process from that checkpoint (same schedule length): state continues where it stopped
    probe = ResumeProbe(n_steps=2)
    extra = [f"ckpt_path={ckpt_dir / 'last.ckpt'}"]
    cfg_steps = 100000
    objs = _run(tmp_path / "probe", max_steps=cfg_steps, save_every=5, extra=extra, probe=probe)
    st = probe.start
    assert st["step"] == s1
    assert st["lr"] == pytest.approx(last["lr_schedulers"][0]["_last_lr"][0], rel=1e-12)
    base_lr = last["optimizer_states"][0]["param_groups"][0]["initial_lr"]
    warm = round(0.05 * cfg_steps)
    assert st["lr"] == pytest.approx(base_lr * warmup_cosine(s1, warm, cfg_steps), rel=1e-9)  # not restarted
    assert st["lr"] > base_lr * warmup_cosine(0, warm, cfg_steps)
    assert _max_diff(st["raw"], last["current_model_state"]) == 0.0
    assert _max_diff(st["ema"], last["state_dict"]) == 0.0
    assert _max_diff(st["ema"], st["raw"]) > 0  # EMA restored as EMA, not re-initialised from the raw weights
    assert st["ema_updates"] == last["callbacks"]["EMA"]["num_updates"] > 0
    assert st["adam_step"] == s1
    assert objs["trainer"].global_step == s1 + 2

    # 3) the CLI resumes the killed run in its own directory; SIGTERM then saves last.ckpt and exits 0
    log2 = tmp_path / "p2.log"
    t_start = time.time()
    p2 = _start([*args, "ckpt_path=last"], log2)
    _wait_for(
        lambda: any(p.stat().st_mtime > t_start for p in ckpt_dir.glob("step_*.ckpt")),
        p2,
        400,
        "a checkpoint written by the resumed run",
        log2,
    )
    before = (ckpt_dir / "last.ckpt").stat().st_mtime_ns
    p2.send_signal(signal.SIGTERM)
    p2.wait(timeout=300)
    out = log2.read_text()
    assert p2.returncode == 0, out[-3000:]
    assert "stopping at step" in out
    ck = load_checkpoint(ckpt_dir / "last.ckpt")
    assert (ckpt_dir / "last.ckpt").stat().st_mtime_ns > before
    assert ck["global_step"] > s1
    # the killed run may have left later step files than last.ckpt; only the resumed run's files must not be ahead
    assert ck["global_step"] >= max(_steps(ckpt_dir, newer_than=t_start))
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    steps_logged = [int(r.split(",")[header.index("step")]) for r in logged[1:] if r.split(",")[header.index("step")]]
    assert max(steps_logged) >= s1  # the resumed run kept counting from the checkpoint's step


# ---------------------------------------------------------------------------------------------- fine-tuning
def test_init_from_ema_is_continued_by_the_first_update_not_replaced(uninterrupted, tmp_path):
    """After init_from the first EMA update blends the loaded average with the new raw weights at the decay the source
    run reached (no new warm-up); it does not restart the average from the raw weights."""
    from difflab.callbacks.ema import ema_decay

    src = load_checkpoint(uninterrupted / "checkpoints" / "step_0000030.ckpt")
    _run(
        tmp_path / "ft",
        max_steps=1,
        save_every=1,
        extra=[f"init_from={uninterrupted / 'checkpoints' / 'step_0000030.ckpt'}"],
    )
    first = load_checkpoint(tmp_path / "ft" / "checkpoints" / "step_0000001.ckpt")
    ema_cfg = compose_train(tmp_path / "cfg", tiny_overrides(extra=[*QUIET, *NOLOG])).callbacks.ema
    d = ema_decay(ema_cfg.decay, src["callbacks"]["EMA"]["num_updates"], ema_cfg.warmup)
    assert 0.5 < d < 1
    floats = [k for k, v in first["state_dict"].items() if v.is_floating_point()]
    expect = {k: d * src["state_dict"][k] + (1 - d) * first["current_model_state"][k] for k in floats}
    assert _max_diff({k: first["state_dict"][k] for k in floats}, expect) < 1e-5
    assert (
        _max_diff({k: first["state_dict"][k] for k in floats}, {k: first["current_model_state"][k] for k in floats})
        > 1e-4
    )


def test_init_from_loads_weights_and_ema_with_fresh_optimizer(uninterrupted, tmp_path, capsys):
    src = uninterrupted / "checkpoints" / "step_0000030.ckpt"
    ck = load_checkpoint(src)
    probe = ResumeProbe(n_steps=1)
    objs = _run(tmp_path / "ft", max_steps=10, save_every=5, extra=[f"init_from={src}"], probe=probe)
    st = probe.start
    assert st["step"] == 0 and st["adam_step"] == 0.0  # new run: fresh counters and optimizer
    base = objs["model"].lr
    assert st["lr"] == pytest.approx(base * warmup_cosine(0, resolve_steps(0.05, 10), 10))  # schedule restarts
    assert _max_diff(st["raw"], ck["current_model_state"]) == 0.0
    assert _max_diff(st["ema"], ck["state_dict"]) == 0.0

    # a wider model: strict refuses and names the keys; non-strict loads what matches and prints a table
    wider = ["model.net.base_channels=16"]
    from difflab.utils.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"shape-mismatched [1-9]\d* \[.*weight"):
        build(compose_train(tmp_path / "strict", tiny_overrides(extra=[*QUIET, *NOLOG, *wider, f"init_from={src}"])))
    capsys.readouterr()
    objs = build(
        compose_train(
            tmp_path / "loose", tiny_overrides(extra=[*QUIET, *NOLOG, *wider, f"init_from={src}", "init_strict=false"])
        )
    )
    table = capsys.readouterr().out
    assert "mismatched" in table and "checkpoint" in table and "model" in table
    rows = [re.split(r"\s{2,}", line) for line in table.splitlines() if line.startswith("mismatched")]
    assert rows and all(len(r) == 4 and r[2] != r[3] for r in rows)  # status, key, checkpoint shape, model shape
    loaded = objs["model"].state_dict()
    same = [
        k for k in ck["current_model_state"] if k in loaded and loaded[k].shape == ck["current_model_state"][k].shape
    ]
    assert same and all(torch.equal(loaded[k], ck["current_model_state"][k]) for k in same)


def test_init_from_and_ckpt_path_exclude_each_other(tmp_path):
    from difflab.utils.errors import ConfigError

    cfg = compose_train(tmp_path, tiny_overrides(extra=[*QUIET, *NOLOG, "init_from=/a.ckpt", "ckpt_path=/b.ckpt"]))
    with pytest.raises(ConfigError, match="exclude each other"):
        build(cfg)


# ---------------------------------------------------------------------------------------------- NaN guard
class Inject(L.Callback):
    """Makes the loss NaN at ``nan_loss_steps`` and one gradient NaN at ``nan_grad_steps``; records weights."""

    def __init__(self, nan_loss_steps=(), nan_grad_steps=()):
        self.nan_loss_steps, self.nan_grad_steps = set(nan_loss_steps), set(nan_grad_steps)
        self.before, self.after = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]
        if trainer.global_step in self.nan_loss_steps:
            batch["x"][0, 0, 0, 0] = float("nan")  # one corrupt pixel poisons the whole batch loss

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.nan_grad_steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.parameters()]


def test_nan_guard_skips_counts_and_stops_after_k_in_a_row(tmp_path):
    from difflab.ops.nan_guard import NonFiniteGuard, TrainingDivergedError

    inject = Inject(nan_loss_steps={2, 6, 7, 8}, nan_grad_steps={4})
    cfg = compose_train(
        tmp_path,
        tiny_overrides(
            max_steps=20, save_every=2, extra=[*QUIET, *NOLOG, "callbacks.nonfinite_guard.max_consecutive=3"]
        ),
    )
    objs = build(cfg)
    objs["trainer"].callbacks.insert(0, inject)
    with pytest.raises(TrainingDivergedError) as err:
        objs["trainer"].fit(objs["model"], datamodule=objs["datamodule"])
    guard = next(cb for cb in objs["trainer"].callbacks if isinstance(cb, NonFiniteGuard))
    assert guard.skipped_steps == [2, 4, 6, 7, 8]
    assert guard.skipped_total == 5
    for s in (2, 4, 6, 7):  # skipped steps leave every weight exactly as it was
        assert all(torch.equal(a, b) for a, b in zip(inject.before[s], inject.after[s]))
    for s in (1, 3, 5):  # good steps train
        assert not all(torch.equal(a, b) for a, b in zip(inject.before[s], inject.after[s]))
    assert all(torch.isfinite(p).all() for p in objs["model"].parameters())
    msg = str(err.value)
    last_good = tmp_path / "checkpoints" / "step_0000006.ckpt"
    assert "stopped at step 8" in msg and "3 consecutive" in msg and "5 skipped in total" in msg
    assert str(last_good) in msg or str(tmp_path / "checkpoints" / "last.ckpt") in msg
    assert "\n" not in msg
