"""``RunCheckpoint``: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` always holds the run's final step.

Two gaps of ``ModelCheckpoint`` (lightning 2.6, ``lightning/pytorch/callbacks/model_checkpoint.py``) closed here:

1. No final checkpoint. ``last.ckpt`` is written only together with a periodic (top-k) save, and ``on_train_end``
   writes it only when the fit saved nothing at all (``if self.save_last and not self._last_checkpoint_saved``).
   45 steps with a checkpoint every 30 leave ``last.ckpt`` at step 30 (Lightning#8126). ``RunCheckpoint`` writes
   ``last.ckpt`` at the final step whatever ended the run (``max_steps``, ``max_epochs``, ``max_time``,
   ``EarlyStopping``, any ``trainer.should_stop``), at a moment where a periodic checkpoint could have been taken:
   ``on_train_batch_end`` of the last batch when the stop is known there (``max_steps``, ``max_epochs``, the ``Timer``
   of ``max_time``, any callback that set ``should_stop``: checkpoint callbacks run last), else ``on_validation_end``
   (``EarlyStopping``, which decides there unless it checks at epoch end). Those are the moments Lightning's own
   periodic checkpoints are taken in: a final checkpoint from the last batch equals the periodic checkpoint of that
   step field by field (loops, optimizer, RNG and data-loader states, EMA in ``state_dict``, raw weights in
   ``current_model_state``), and both kinds resume with the batches the uninterrupted run would have seen next
   (measured mid-epoch and at an epoch boundary). Stops that only show later (a LightningModule hook, ``EarlyStopping`` checking at
   epoch end) are saved in ``on_train_epoch_end`` or, as a last resort, ``on_train_end``: still complete and
   resumable, but their loop state is past the batch (measured: at an epoch boundary the resumed data order differs;
   after ``on_train_end`` the epoch counter is one ahead, and EMA has swapped its weights into the model, which
   difflab's ``EMA`` compensates by writing the raw weights to ``current_model_state``). A step already in
   ``last.ckpt`` (a periodic save at the final step, ``GracefulShutdown``'s save on SIGTERM) is not written again.
   No ``step_XXXXXXX.ckpt`` is added at the final step: those are the every-N-steps series (and the top-k candidates
   when ``monitor`` is set); the final weights live in ``last.ckpt``.
2. ``last-v1.ckpt`` after a resume. ``_save_last_checkpoint`` appends ``-v{n}`` while the target file exists and is not
   ``self.last_model_path``; that attribute comes back from the resumed checkpoint's callback state, and it is empty
   in a checkpoint saved before the first ``last.ckpt`` of its run (the first periodic checkpoint) or differs when
   the checkpoint came from another directory or an older run. ``RunCheckpoint`` sets ``last_model_path`` (public)
   to ``<dirpath>/last.ckpt`` at the start of every fit, so the file is overwritten in place (atomically, through the
   trainer's ``CheckpointIO``) and ``ckpt_path=last`` is always the newest state of the run directory. Periodic
   names keep Lightning's version counter (resuming from an older checkpoint writes ``step_0000060-v1.ckpt`` next to
   the abandoned run's ``step_0000060.ckpt``).

Private Lightning API used (lightning>=2.6,<2.7 is pinned; ``tests/test_final_checkpoint.py`` fails if it changes):
``ModelCheckpoint._last_global_step_saved`` (read: the step of Lightning's own last save, which it always pairs with
``last.ckpt``), ``_last_checkpoint_saved`` (written after the final save, as ``GracefulShutdown`` does, so that
``save_last="link"`` never re-links ``last.ckpt`` to an older file) and the ``filepath != self.last_model_path`` test
in ``_save_last_checkpoint`` that the fixed ``last_model_path`` relies on (Lightning#11451).

Wire it with ``callbacks.model_checkpoint._target_: difflab.ops.final_checkpoint.RunCheckpoint``; it takes every
argument of ``ModelCheckpoint`` and keeps its checkpoint state key, so runs written by either class resume with the
other.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from difflab.ops.signals import find_shutdown

log = logging.getLogger(__name__)


def _same_file(a: Any, b: Any) -> bool:
    return bool(a) and bool(b) and os.path.realpath(str(a)) == os.path.realpath(str(b))


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` + ``last.ckpt`` at the final step of every fit + never ``last-v{n}.ckpt``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._held_step = -1  # the global step whose state last.ckpt holds (-1: unknown / none this fit)
        self._shutdown_seen = False  # GracefulShutdown's save of this fit has been accounted for
        self.final_checkpoint: dict[str, Any] | None = None  # {"path", "step", "at"} of the final save of this fit

    # ------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        """``ModelCheckpoint``'s key (``ModelCheckpoint{'monitor': ..., ...}``): checkpoints of runs trained with plain
        ``ModelCheckpoint`` restore into this class (top-k bookkeeping included) and the other way round."""
        key = super().state_key
        return ModelCheckpoint.__qualname__ + key[len(type(self).__qualname__) :]

    # ------------------------------------------------------------------ paths and state
    def last_checkpoint_path(self, trainer: L.Trainer) -> str:
        """Where ``last.ckpt`` goes (``CHECKPOINT_NAME_LAST`` formatted like Lightning does, in ``dirpath``)."""
        metrics = dict(trainer.callback_metrics)
        metrics["epoch"] = torch.tensor(trainer.current_epoch)
        metrics["step"] = torch.tensor(trainer.global_step)
        return self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)

    def _fixed_last_name(self) -> bool:
        return "{" not in self.CHECKPOINT_NAME_LAST  # "{epoch}-last" would name a new file each time

    def _note_lightning_save(self, trainer: L.Trainer) -> None:
        """Lightning wrote ``last.ckpt`` at this step (it always pairs a periodic save with ``last``)."""
        if self.save_last and trainer.global_step > 0 and self._last_global_step_saved == trainer.global_step:
            self._held_step = trainer.global_step

    def _note_shutdown_save(self, trainer: L.Trainer) -> None:
        """``GracefulShutdown`` (which runs before checkpoint callbacks) saved ``last.ckpt`` at this batch."""
        if self._shutdown_seen:
            return
        shutdown = find_shutdown(trainer)
        if shutdown is not None and shutdown.saved_path:
            self._shutdown_seen = True
            if _same_file(shutdown.saved_path, self.last_checkpoint_path(trainer)):
                self._held_step = trainer.global_step

    # ------------------------------------------------------------------ when does training end?
    @staticmethod
    def _can_stop_early(trainer: L.Trainer) -> bool:
        """``trainer.should_stop`` is honoured (``min_epochs`` / ``min_steps`` met), as in Lightning's fit loop."""
        loop = trainer.fit_loop
        met_epochs = loop.epoch_progress.current.processed >= loop.min_epochs if loop.min_epochs else True
        met_steps = trainer.global_step >= loop.min_steps if loop.min_steps else True
        return met_epochs and met_steps

    @staticmethod
    def _max_steps_reached(trainer: L.Trainer) -> bool:
        return trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps

    def _ends_after_batch(self, trainer: L.Trainer) -> bool:
        """Training stops after this batch (its validation, if one is due, still runs)."""
        if self._max_steps_reached(trainer):
            return True
        loop = trainer.fit_loop
        batches = loop.epoch_loop.batch_progress
        epoch_done = batches.is_last_batch or batches.current.ready >= trainer.num_training_batches
        max_epochs = loop.max_epochs
        if (
            epoch_done
            and max_epochs is not None
            and max_epochs != -1
            and loop.epoch_progress.current.processed + 1 >= max_epochs
        ):
            return True
        return bool(trainer.should_stop) and self._can_stop_early(trainer)

    def _ends_after_epoch(self, trainer: L.Trainer) -> bool:
        """In ``on_train_epoch_end`` (the epoch counts as processed): the fit loop stops now."""
        if self._max_steps_reached(trainer):
            return True
        loop = trainer.fit_loop
        max_epochs = loop.max_epochs
        if max_epochs is not None and max_epochs != -1 and loop.epoch_progress.current.processed >= max_epochs:
            return True
        return bool(trainer.should_stop) and self._can_stop_early(trainer)

    def _may_save(self, trainer: L.Trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return (
            bool(self.save_last)
            and not trainer.fast_dev_run
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and trainer.global_step > 0
            and trainer.global_step != self._held_step
        )

    # ------------------------------------------------------------------ the final save
    def save_final(self, trainer: L.Trainer, at: str) -> str | None:
        """Write ``last.ckpt`` now unless it already holds this step; a collective (every rank calls it)."""
        if not self._may_save(trainer):
            return None
        path = self.last_checkpoint_path(trainer)
        previous, self.last_model_path = self.last_model_path, path  # before saving: it is part of the state
        trainer.save_checkpoint(path, self.save_weights_only)
        self._last_checkpoint_saved = path  # save_last="link" must not re-link last.ckpt to an older file
        self._held_step = trainer.global_step
        self.final_checkpoint = {"path": path, "step": trainer.global_step, "at": at}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
        if previous and not _same_file(previous, path) and self._owned(trainer, previous):
            trainer.strategy.remove_checkpoint(previous)  # a templated CHECKPOINT_NAME_LAST: one last file
        if trainer.is_global_zero:
            log.info("final checkpoint %s (step %d, written at %s)", path, trainer.global_step, at)
        return path

    def _owned(self, trainer: L.Trainer, path: str) -> bool:
        """A file of this callback's directory that training did not resume from (Lightning's removal rule)."""
        if not self.dirpath or _same_file(path, trainer.ckpt_path):
            return False
        return os.path.dirname(os.path.realpath(path)) == os.path.realpath(str(self.dirpath))

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._held_step, self._shutdown_seen, self.final_checkpoint = -1, False, None
        if not self.save_last or not self._fixed_last_name():
            return
        path = self.last_checkpoint_path(trainer)
        if _same_file(trainer.ckpt_path, path):
            self._held_step = trainer.global_step  # resumed from last.ckpt: it holds this step already
        if not _same_file(self.last_model_path, path):
            # after the checkpoint state was restored: an empty or versioned path there would make Lightning write
            # last-v1.ckpt next to this directory's last.ckpt
            if self.file_exists(path, trainer) and trainer.ckpt_path is None and trainer.is_global_zero:
                log.warning(
                    "%s exists and this fit does not resume from a checkpoint: it will be overwritten "
                    "(resume with ckpt_path=last to continue that run)",
                    path,
                )
            self.last_model_path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._note_lightning_save(trainer)
        self._note_shutdown_save(trainer)
        if self._ends_after_batch(trainer):
            self.save_final(trainer, "the last training batch")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._note_lightning_save(trainer)
        if (trainer.should_stop and self._can_stop_early(trainer)) or self._max_steps_reached(trainer):
            self.save_final(trainer, "validation end")  # e.g. EarlyStopping (runs before checkpoint callbacks)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._note_lightning_save(trainer)
        if self._ends_after_epoch(trainer):
            self.save_final(trainer, "train epoch end")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Replaces ModelCheckpoint.on_train_end ("save last if this fit saved nothing"). Reached with an unsaved final
        # step only when something stopped training out of sight of the hooks above; by now callbacks ordered before
        # this one have run their on_train_end (EMA has swapped its weights into the model: difflab's EMA still writes
        # raw weights to current_model_state) and the loops have closed the epoch.
        self._note_lightning_save(trainer)
        self.save_final(trainer, "train end")
