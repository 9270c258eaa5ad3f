"""Per-noise-level validation loss as curves over training.

The DiffusionModule already measures the validation loss per log-SNR bucket (``val_loss_t/bucket_XX`` scalars, kept
in ``module.val_loss_per_bucket``; EMA weights during validation; buckets from ``objectives.log_snr_buckets``, the
same for every process, so curves of vp, edm and flow runs compare). This callback keeps the history (also in
checkpoints, so ``report.py`` can redraw it) and plots it: left, loss against log-SNR, one curve per validation
(darker = earlier); right, each bucket's loss against the training step. The research log found a model that was
bad at low noise levels this way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L

from difflab.callbacks.figures import log_scalars
from difflab.diagnostics.timestep_loss import timestep_loss_figure
from difflab.utils.logging import figure_path, log_image


class TimestepLossCallback(L.Callback):
    """After every ``every_n_validations``-th validation, append the module's per-bucket loss and redraw the figure.

    Scalars: ``val_loss_t/bucket_XX`` come from the module itself; this adds ``val_loss_t/worst_bucket`` (index of
    the highest-loss bucket) and ``val_loss_t/low_t_ratio`` (loss of the least-noisy bucket over the mean), which
    flag "bad at low noise levels" at a glance.
    """

    kind = "timestep_loss"

    def __init__(self, every_n_validations: int = 1):
        if every_n_validations < 1:
            raise ValueError(f"timestep_loss.every_n_validations must be >= 1; got {every_n_validations}")
        self.every_n_validations = int(every_n_validations)
        self.history: list[tuple[int, list[float]]] = []
        self.written: list[Path] = []
        self._count = 0

    @staticmethod
    def scalars(losses: Sequence[float]) -> dict[str, float]:
        """Summary scalars of one per-bucket loss vector."""
        seen = [v for v in losses if v > 0]  # a bucket with no validation sample has loss 0
        mean = sum(seen) / len(seen) if seen else 0.0
        worst = max(range(len(losses)), key=lambda i: losses[i])
        first = seen[0] if seen else 0.0  # the least noisy bucket with samples
        return {
            "val_loss_t/worst_bucket": float(worst),
            "val_loss_t/low_t_ratio": first / mean if mean and first > 0 else float("nan"),
        }

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after the module's on_validation_epoch_end, which fills val_loss_per_bucket.
        losses = getattr(pl_module, "val_loss_per_bucket", None)
        if trainer.sanity_checking or not losses or trainer.global_rank != 0:
            return
        step = trainer.global_step
        if self.history and self.history[-1][0] == step:
            self.history[-1] = (step, list(losses))
        else:
            self.history.append((step, [float(v) for v in losses]))
        self._count += 1
        log_scalars(trainer, self.scalars(losses), step)
        if (self._count - 1) % self.every_n_validations:
            return
        path = timestep_loss_figure(self.history, figure_path(trainer.default_root_dir, self.kind, step))
        self.written.append(path)
        log_image(trainer, f"diagnostics/{self.kind}", path, step, caption=f"per-timestep validation loss, step {step}")

    def state_dict(self) -> dict[str, Any]:
        return {"history": [[s, list(v)] for s, v in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(s), [float(x) for x in v]) for s, v in state_dict.get("history", [])]

    def report(self, module, out_dir: Path, context: dict[str, Any]) -> dict[str, float]:
        """report.py: the stored history (from the checkpoint) plus the loss of these weights on the val set."""
        history = list(context.get("timestep_loss_history") or [])
        losses = context.get("val_loss_per_bucket")
        if losses:
            step = int(context.get("step", history[-1][0] if history else 0))
            if not history or history[-1][0] != step:
                history.append((step, list(losses)))
        if not history:
            return {}
        timestep_loss_figure(
            history,
            Path(out_dir) / f"{self.kind}.png",
            title="validation loss per timestep bucket (history from the checkpoint, last point: these EMA weights)",
        )
        return self.scalars(history[-1][1])
