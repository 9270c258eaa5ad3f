"""Graceful stop on SIGTERM / SIGINT and on the cluster's requeue signal: save a checkpoint, then exit cleanly.

``GracefulShutdown`` replaces the handlers once training starts (after Lightning registered its own). A signal only
sets a flag; at the end of the current batch all ranks agree (any rank signalled -> all stop), ``last.ckpt`` is
written atomically and training stops; ``train.py`` then exits with status 0. A second Ctrl-C raises
KeyboardInterrupt at once (hard stop).

Requeue (SLURM): ``requeue_signal`` (default SIGUSR2, the one submitit asks SLURM to send ``signal_delay_s`` before
the time limit; SIGUSR1 is avoided because NCCL may use it) is handled the same way, and after the checkpoint is
written ``after_fit`` hands over to whoever owns requeueing: the handler that was installed before ours (submitit's,
which requeues the job) or, without one, ``scontrol requeue $SLURM_JOB_ID`` from global rank 0. The requeued job
finds the checkpoint with ``resume`` (automatic when ``SLURM_RESTART_COUNT`` > 0, see ``difflab.ops.resume``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


def signal_number(name: str | int | None) -> signal.Signals | None:
    """'SIGUSR2' / 'USR2' / 12 -> signal.SIGUSR2; None or an unknown name on this platform -> None."""
    if name is None:
        return None
    if isinstance(name, int):
        return signal.Signals(name)
    name = str(name).upper()
    return getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """Where this run's checkpoints go (ModelCheckpoint's dirpath, else <run>/checkpoints)."""
    cb = trainer.checkpoint_callback
    dirpath = getattr(cb, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"


class GracefulShutdown(L.Callback):
    """On SIGTERM / SIGINT / ``requeue_signal``: finish the batch, save ``last.ckpt``, stop training cleanly."""

    def __init__(
        self,
        signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGINT"),
        requeue_signal: str | None = "SIGUSR2",
        save_checkpoint: bool = True,
        filename: str = "last.ckpt",
    ):
        self.stop_signals = [s for s in (signal_number(n) for n in signals) if s is not None]
        self.requeue_signal = signal_number(requeue_signal)
        self.save_checkpoint, self.filename = save_checkpoint, filename
        self.received: signal.Signals | None = None  # the first signal this process received
        self.stopped = False  # training was stopped by a signal (on every rank)
        self.requeue = False  # ... and it was the requeue signal
        self.saved_path: str | None = None
        self._previous: dict[int, Any] = {}  # handlers we replaced, while training runs
        self._previous_after: dict[int, Any] = {}  # ... kept after teardown for the requeue hand-over

    # ------------------------------------------------------------------ handlers
    def _handler(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        if self.received is None:
            self.received = signal.Signals(signum)
            log.warning("received %s: will save a checkpoint and stop after the current batch", self.received.name)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("GracefulShutdown: not in the main thread, signal handlers not installed")
            return
        for sig in self.stop_signals + ([self.requeue_signal] if self.requeue_signal else []):
            if sig not in self._previous:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self.stopped, self.requeue, self.saved_path = None, False, False, None
        self._install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flag = self.received is not None
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
            requeue = (
                trainer.strategy.reduce_boolean_decision(
                    self.received == self.requeue_signal and self.requeue_signal is not None, all=False
                )
                if flag
                else False
            )
        else:
            requeue = flag and self.received == self.requeue_signal
        if not flag or self.stopped:
            return
        self.stopped, self.requeue = True, bool(requeue)
        if self.save_checkpoint:
            path = checkpoint_dir(trainer) / self.filename
            cb = trainer.checkpoint_callback
            if cb is not None and hasattr(cb, "last_model_path"):
                cb.last_model_path = str(path)
            trainer.save_checkpoint(str(path))  # collective: every rank calls it, rank 0 writes
            self.saved_path = str(path)
            if cb is not None and hasattr(cb, "_last_checkpoint_saved"):
                # ModelCheckpoint writes last.ckpt again at train end when it saved nothing itself during this fit;
                # by then the EMA weights have been copied into the model, so that file would lose the raw weights
                cb._last_checkpoint_saved = str(path)
        log.warning(
            "stopping at step %d after %s%s",
            trainer.global_step,
            self.received.name if self.received else "a signal on another rank",
            f"; checkpoint: {self.saved_path}" if self.saved_path else "",
        )
        trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._previous_after = dict(self._previous)
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    # ------------------------------------------------------------------ after fit
    def after_fit(self, trainer: L.Trainer) -> None:
        """Hand a requeue over to the cluster tooling once fit has returned (call from the training script)."""
        if not self.requeue or self.requeue_signal is None:
            return
        prev = self._previous_after.get(self.requeue_signal)
        if callable(prev):  # submitit's handler: requeues (global rank 0) and exits
            log.info(
                "handing %s to the previous handler (%s) for requeueing",
                self.requeue_signal.name,
                getattr(prev, "__qualname__", prev),
            )
            prev(int(self.requeue_signal), None)
            return
        job = os.environ.get("SLURM_JOB_ID")
        if job and trainer.is_global_zero:
            array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
            job_id = f"{array_job}_{array_task}" if array_job and array_task else job
            result = subprocess.call(["scontrol", "requeue", job_id])
            log.info("scontrol requeue %s -> %s", job_id, "ok" if result == 0 else f"failed ({result})")


def find_shutdown(trainer: L.Trainer) -> GracefulShutdown | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, GracefulShutdown)), None)
