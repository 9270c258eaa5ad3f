"""Fixed-seed sample grid: one row per class (or prompt) plus an unconditional row, the same noise in each column."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from difflab.callbacks.figures import log_scalars, publish_metrics
from difflab.callbacks.schedule import is_scheduled
from difflab.diagnostics.class_grid import render_grid, render_scored_grid
from difflab.eval.grid_judge import build_judge
from difflab.metrics.protocol import write_protocol
from difflab.ops.ema_weights import ema_module, prepare_ema_weights
from difflab.utils.conditions import condition_key
from difflab.utils.logging import figure_path, log_image


class ClassGridCallback(L.Callback):
    """Every ``every_n_steps`` (densely early) and at the end of training, sample a fixed-seed grid with EMA weights.

    With a judge (``judge=auto``: the digit classifier for digits, CLIP when ``clip_model`` is a local CLIP
    directory) each cell is labelled with the judge's predicted class and score, and the agreement rate is logged
    as ``metrics/grid_agreement`` (also in ``trainer.callback_metrics``, so checkpoints can monitor it)."""

    samples_ema_weights = True  # difflab.ops.ema_weights: draws from the EMA weights

    def __init__(
        self,
        every_n_steps: int = 500,
        n_cols: int = 8,
        seed: int = 0,
        guidance_scale: float | None = None,
        dense_early: bool = False,
        at_end: bool = True,
        tag_suffix: str = "",
        guidance: dict | None = None,
        judge: str = "none",
        clip_model: str | None = None,
        digit_classifier_weights: str | None = None,
    ):
        self.every_n_steps, self.n_cols, self.seed = every_n_steps, n_cols, seed
        self.guidance = dict(guidance) if guidance else None  # overrides of the guidance group (method and its keys)
        self.kind = "class_grid" + (f"_{tag_suffix}" if tag_suffix else "")
        self.guidance_scale, self.dense_early, self.at_end = guidance_scale, dense_early, at_end
        self.judge_kind, self.clip_model, self.digit_weights = judge, clip_model, digit_classifier_weights
        self._judge = None
        self._judge_built = False
        self._protocol_written = False
        self.written: list[Path] = []
        self.published: dict[str, float] = {}

    def judge_for(self, module):
        """The judge of this grid (built once), or None."""
        if not self._judge_built:
            self._judge_built = True
            self._judge = build_judge(self.judge_kind, module, self.clip_model, self.digit_weights)
        return self._judge

    @rank_zero_only
    def _render(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str | None = None) -> dict[str, float]:
        step = trainer.global_step
        module = ema_module(trainer, pl_module)
        path = figure_path(trainer.default_root_dir, self.kind, step)
        if tag:
            path = path.with_name(f"{tag}.png")
        g = module.diffusion.guidance_for(self.guidance)
        scale = self.guidance_scale if self.guidance_scale is not None else g.scale
        caption = f"step {step}, guidance {g.name} {scale}"
        judge = self.judge_for(module) if condition_key(module) is not None else None
        scalars: dict[str, float] = {}
        if judge is not None:
            path, agreement = render_scored_grid(
                module, judge, path, self.n_cols, self.guidance_scale, self.seed, guidance=self.guidance
            )
            scalars = {"metrics/grid_agreement": agreement}
            if not self._protocol_written:
                self._protocol_written = True
                write_protocol(
                    trainer.default_root_dir,
                    {
                        "metrics/grid_agreement": {
                            "eval_seed": self.seed,
                            "n_cols": self.n_cols,
                            "feature": judge.name,
                            "guidance": f"{g.name} {scale}",
                            "sampler": module.diffusion.describe_sampler(),
                        }
                    },
                )
            caption += f", judge {judge.name}: agreement {agreement:.0%}"
            log_scalars(trainer, scalars, step)
        else:
            render_grid(module, path, self.n_cols, self.guidance_scale, self.seed, guidance=self.guidance)
        self.written.append(path)
        log_image(trainer, f"samples/{self.kind}", path, step, caption=caption)
        return scalars

    def _render_everywhere(self, trainer, pl_module, in_loop: bool, tag: str | None = None) -> None:
        """Render on rank 0; every rank then holds rank 0's agreement rate (DDP ranks must agree on monitored
        metrics)."""
        prepare_ema_weights(trainer, pl_module)  # every rank: under FSDP they gather the EMA weights together
        scalars = self._render(trainer, pl_module, tag=tag)
        if trainer.world_size > 1:
            scalars = trainer.strategy.broadcast(scalars, src=0)
        publish_metrics(trainer, pl_module, scalars, self.published, in_loop=in_loop)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        if getattr(self, "_last_step", -1) != step and is_scheduled(step, self.every_n_steps, self.dense_early):
            self._last_step = step
            self._render_everywhere(trainer, pl_module, in_loop=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self._render_everywhere(trainer, pl_module, in_loop=False, tag="final")
