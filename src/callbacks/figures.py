"""Shared pieces of the diagnostic callbacks: their schedule / EMA / logging base class, labelled image mosaics
(PIL), matplotlib figure writing, fixed real batches and scalar logging.

Every diagnostic draws from a module alone (a plain function per figure), so the callbacks (during training, EMA
weights) and ``report.py`` (from a checkpoint) produce the same pictures.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from difflab.callbacks.schedule import is_scheduled
from difflab.ops.ema_weights import ema_module, prepare_ema_weights
from difflab.utils.logging import figure_path, log_image

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ logging
@rank_zero_only
def log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send scalars to every active logger at ``step`` (rank 0 only); non-finite values are logged as they are."""
    if not metrics:
        return
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        try:
            logger.log_metrics(clean, step=step)
        except Exception as err:  # a logger failing must not stop training
            log.warning("could not log %s to %s: %s", sorted(clean), type(logger).__name__, err)


def publish_metrics(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    scalars: dict[str, float] | None,
    published: dict[str, float],
    in_loop: bool,
) -> None:
    """Make a callback's scalars visible to Lightning: ``trainer.callback_metrics`` (so that
    ``ModelCheckpoint(monitor=...)``, ``EarlyStopping`` and the sweeper's ``optimized_metric`` can use sample metrics),
    and remember them in ``published`` (read by the training pipeline after ``fit``).

    Inside the training loop they go through ``LightningModule.log`` (logger=False: the loggers already got them
    at their exact step from ``log_scalars``); every rank holds the same values (computed on all ranks or broadcast
    from rank 0), so DDP ranks agree on what ``ModelCheckpoint`` monitors. After the loop (``on_train_end``)
    Lightning allows no ``log`` call: the values are kept in ``published`` only.
    """
    if not scalars:
        return
    values = {k: float(v) for k, v in scalars.items()}
    published.update(values)
    if in_loop:
        for name, value in values.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, logger=False, prog_bar=False, batch_size=1)


# ------------------------------------------------------------------------------------------------ base callback
class DiagnosticCallback(L.Callback):
    """Calls ``draw(module, path, context) -> scalars`` on the dense-early schedule and at the end of training, then
    logs the figure at ``path`` (``<run>/figures/<kind>/step_XXXXXXX.png``) and the scalars to every logger.

    Subclasses set ``kind`` (figure folder and logger key) and implement ``draw``; ``module`` is the EMA-weighted
    module; ``draw`` returns None when it has nothing to show. Figures are drawn on rank 0 only unless ``all_ranks``
    is True (diagnostics that shard work across DDP ranks).
    """

    kind = "diagnostic"
    all_ranks = False
    samples_ema_weights = True  # difflab.ops.ema_weights: draws from the EMA weights

    def __init__(self, every_n_steps: int = 1000, dense_early: bool = True, at_end: bool = True):
        if every_n_steps < 0:
            raise ValueError(
                f"{type(self).__name__}: every_n_steps must be >= 0 (0: only dense-early / at end); got {every_n_steps}"
            )
        self.every_n_steps, self.dense_early, self.at_end = int(every_n_steps), bool(dense_early), bool(at_end)
        self.written: list[Path] = []
        self.published: dict[str, float] = {}  # the latest scalars, as put into trainer.callback_metrics
        self._last_step = -1

    # hooks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or step == self._last_step:
            return
        if is_scheduled(step, self.every_n_steps, self.dense_early):
            self._last_step = step
            publish_metrics(trainer, pl_module, self._run(trainer, pl_module, step), self.published, in_loop=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and self._last_step != trainer.global_step:
            self._last_step = trainer.global_step
            publish_metrics(
                trainer, pl_module, self._run(trainer, pl_module, trainer.global_step), self.published, in_loop=False
            )

    def _run(self, trainer, pl_module, step: int) -> dict[str, float] | None:
        """Draw (on rank 0, or on every rank when ``all_ranks``), log figure and scalars from rank 0, and return
        rank 0's scalars on every rank (for ``trainer.callback_metrics``)."""
        scalars = None
        prepare_ema_weights(trainer, pl_module)  # every rank: under FSDP they gather the EMA weights together
        if self.all_ranks or trainer.global_rank == 0:
            module = ema_module(trainer, pl_module)
            path = figure_path(trainer.default_root_dir, self.kind, step)
            context = {"trainer": trainer, "datamodule": getattr(trainer, "datamodule", None), "step": step}
            scalars = self.draw(module, path, context)
            if trainer.global_rank == 0 and scalars is not None:
                if path.is_file():
                    self.written.append(path)
                    log_image(trainer, f"diagnostics/{self.kind}", path, step, caption=f"{self.kind}, step {step}")
                log_scalars(trainer, scalars, step)
        if trainer.world_size > 1:
            scalars = trainer.strategy.broadcast(scalars, src=0)
        return scalars

    def draw(self, module, path: Path, context: dict[str, Any]) -> dict[str, float] | None:
        """Write the figure at ``path`` (if any) and return scalars to log."""
        raise NotImplementedError

    def report(self, module, out_dir: Path, context: dict[str, Any]) -> dict[str, float]:
        """The same diagnostic for ``report.py``: writes ``<out_dir>/<kind>.png``; returns its scalars."""
        return self.draw(module, Path(out_dir) / f"{self.kind}.png", context) or {}
