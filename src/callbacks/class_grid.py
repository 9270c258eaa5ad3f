"""Fixed-seed sample grid: one row per class (or prompt) plus an unconditional row, the same noise in each column."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from difflab.ops.ema_weights import ema_module, prepare_ema_weights
from difflab.callbacks.figures import captioned_grid, condition_key, log_scalars, publish_metrics
from difflab.callbacks.schedule import is_scheduled
from difflab.eval.grid_judge import agreement_rate, build_judge
from difflab.metrics.protocol import write_protocol
from difflab.utils.images import auto_upscale, make_grid, save_png, to_uint8
from difflab.utils.logging import figure_path, log_image


def grid_conditions(module, n_cols: int):
    """Raw conditions for the grid rows (each repeated n_cols times) and the row titles."""
    key = module.conditioner.batch_key
    if key == "label":
        k = module.conditioner.num_classes
        rows = list(range(k))
        titles = module.diffusion.class_names or [str(i) for i in rows]
        raw = torch.tensor(rows + [module.conditioner.null_index], device=module.device).repeat_interleave(n_cols)
        return raw, titles + ["(uncond)"]
    if key == "text":
        prompts = list(module.diffusion.prompts or [])[:10]
        rows = prompts + [""]
        return [p for p in rows for _ in range(n_cols)], prompts + ["(uncond)"]
    return None, ["samples"]


def sample_grid(module, n_cols: int = 8, guidance_scale=None, seed: int = 0, sampler=None,
                guidance: dict | None = None):
    """The fixed-noise grid samples (one row per class / prompt, then the unconditional row; the same noise in each
    column), with the raw conditions and row titles."""
    raw, titles = grid_conditions(module, n_cols)
    n_rows = len(titles) if raw is not None else 4
    g = torch.Generator().manual_seed(seed)
    shape = module.diffusion.sample_shape
    noise = torch.randn((n_cols, *shape), generator=g).repeat(n_rows, *([1] * len(shape)))
    x = module.diffusion.sample(module, n_rows * n_cols, raw, sampler=sampler, guidance_scale=guidance_scale,
                                noise=noise, generator=torch.Generator().manual_seed(seed + 1), guidance=guidance)
    if x.ndim == 5:  # videos: show the middle frame in the still grid
        x = x[:, :, x.shape[2] // 2]
    return x, raw, titles


def render_grid(module, out_path: Path, n_cols: int = 8, guidance_scale=None, seed: int = 0,
                sampler=None, guidance: dict | None = None) -> Path:
    """Sample the class/prompt grid with fixed noise and write it as a PNG; returns the path. ``guidance``:
    overrides of the module's guidance settings (e.g. ``{"method": "apg"}``)."""
    x, _, _ = sample_grid(module, n_cols, guidance_scale, seed, sampler, guidance)
    grid = make_grid(to_uint8(x), nrow=n_cols)
    return save_png(grid, out_path, upscale=auto_upscale(x.shape[-1], 64))


def score_grid(judge, x: torch.Tensor, titles: list[str], n_cols: int, as_prompts: bool = False):
    """Judge every cell of a grid from ``sample_grid``: (captions, colours, agreement rate over the conditional
    rows). A cell is green when the judge's prediction is its row's class / prompt, red when not, grey in the
    unconditional row."""
    candidates = titles[:-1]                      # the last row is "(uncond)"
    n_cond = len(candidates) * n_cols
    verdict = judge.judge(x, candidates, as_prompts=as_prompts)
    wanted = torch.arange(len(candidates)).repeat_interleave(n_cols)
    predicted = verdict.predicted
    captions, colours = [], []
    for i in range(len(predicted)):
        name = candidates[int(predicted[i])]
        short = name if len(name) <= 9 else name[:8] + "…"
        score = float(verdict.score[i])
        captions.append(f"{short} {score:.2f}" if verdict.score_name == "p" else f"{short} {score:.0f}")
        colours.append("#777777" if i >= n_cond else ("#1a7f37" if int(predicted[i]) == int(wanted[i]) else "#cf222e"))
    return captions, colours, agreement_rate(predicted[:n_cond], wanted)


def render_scored_grid(module, judge, out_path: Path, n_cols: int = 8, guidance_scale=None, seed: int = 0,
                       sampler=None, guidance: dict | None = None) -> tuple[Path, float]:
    """The class grid with each cell labelled by ``judge`` (predicted class and score); returns the PNG's path and
    the agreement rate (fraction of conditional cells showing their requested class)."""
    x, raw, titles = sample_grid(module, n_cols, guidance_scale, seed, sampler, guidance)
    if raw is None:
        raise ValueError("a scored grid needs a class- or text-conditioned model")
    captions, colours, agreement = score_grid(judge, x, list(titles), n_cols, condition_key(module) == "text")
    title = f"judge: {judge.name}; agreement {agreement:.0%} of {(len(titles) - 1) * n_cols} conditional cells"
    path = captioned_grid(x, n_cols, captions, colours, list(titles), out_path, title=title)
    return path, agreement


class ClassGridCallback(L.Callback):
    """Every ``every_n_steps`` (densely early) and at the end of training, sample a fixed-seed grid with EMA weights.

    With a judge (``judge=auto``: the digit classifier for digits, CLIP when ``clip_model`` is a local CLIP
    directory) each cell is labelled with the judge's predicted class and score, and the agreement rate is logged
    as ``metrics/grid_agreement`` (also in ``trainer.callback_metrics``, so checkpoints can monitor it)."""

    samples_ema_weights = True  # difflab.ops.ema_weights: draws from the EMA weights

    def __init__(self, every_n_steps: int = 500, n_cols: int = 8, seed: int = 0, guidance_scale: float | None = None,
                 dense_early: bool = False, at_end: bool = True, tag_suffix: str = "", guidance: dict | None = None,
                 judge: str = "none", clip_model: str | None = None, digit_classifier_weights: str | None = None):
        self.every_n_steps, self.n_cols, self.seed = every_n_steps, n_cols, seed
        self.guidance = dict(guidance) if guidance else None   # overrides of the guidance group (method and its keys)
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
            path, agreement = render_scored_grid(module, judge, path, self.n_cols, self.guidance_scale, self.seed,
                                                 guidance=self.guidance)
            scalars = {"metrics/grid_agreement": agreement}
            if not self._protocol_written:
                self._protocol_written = True
                write_protocol(trainer.default_root_dir, {"metrics/grid_agreement": {
                    "eval_seed": self.seed, "n_cols": self.n_cols, "feature": judge.name,
                    "guidance": f"{g.name} {scale}", "sampler": module.diffusion.describe_sampler()}})
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
