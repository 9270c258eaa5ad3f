"""Fixed-seed sample grid: one row per class (or prompt) plus an unconditional row, the same noise in each column."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from difflab.callbacks.ema import ema_module
from difflab.callbacks.schedule import is_scheduled
from difflab.utils.images import auto_upscale, make_grid, save_png, to_uint8
from difflab.utils.logging import figure_path, log_image


def grid_conditions(module, n_cols: int):
    """Raw conditions for the grid rows (each repeated n_cols times) and the row titles."""
    key = module.conditioner.batch_key
    if key == "label":
        k = module.conditioner.num_classes
        rows = list(range(k))
        titles = module.class_names or [str(i) for i in rows]
        raw = torch.tensor(rows + [module.conditioner.null_index], device=module.device).repeat_interleave(n_cols)
        return raw, titles + ["(uncond)"]
    if key == "text":
        prompts = list(module.prompts or [])[:10]
        rows = prompts + [""]
        return [p for p in rows for _ in range(n_cols)], prompts + ["(uncond)"]
    return None, ["samples"]


def render_grid(module, out_path: Path, n_cols: int = 8, guidance_scale=None, seed: int = 0,
                sampler=None, guidance: dict | None = None) -> Path:
    """Sample the class/prompt grid with fixed noise and write it as a PNG; returns the path. ``guidance``:
    overrides of the module's guidance settings (e.g. ``{"method": "apg"}``)."""
    raw, titles = grid_conditions(module, n_cols)
    n_rows = len(titles) if raw is not None else 4
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n_cols, *module.sample_shape), generator=g).repeat(n_rows, *([1] * len(module.sample_shape)))
    x = module.sample(n_rows * n_cols, raw, sampler=sampler, guidance_scale=guidance_scale, noise=noise,
                      generator=torch.Generator().manual_seed(seed + 1), guidance=guidance)
    if x.ndim == 5:  # videos: show the middle frame in the still grid
        x = x[:, :, x.shape[2] // 2]
    grid = make_grid(to_uint8(x), nrow=n_cols)
    return save_png(grid, out_path, upscale=auto_upscale(x.shape[-1], 64))


class ClassGridCallback(L.Callback):
    """Every ``every_n_steps`` (densely early) and at the end of training, sample a fixed-seed grid with EMA weights."""

    def __init__(self, every_n_steps: int = 500, n_cols: int = 8, seed: int = 0, guidance_scale: float | None = None,
                 dense_early: bool = False, at_end: bool = True, tag_suffix: str = "", guidance: dict | None = None):
        self.every_n_steps, self.n_cols, self.seed = every_n_steps, n_cols, seed
        self.guidance = dict(guidance) if guidance else None   # overrides of model.guidance (method and its keys)
        self.kind = "class_grid" + (f"_{tag_suffix}" if tag_suffix else "")
        self.guidance_scale, self.dense_early, self.at_end = guidance_scale, dense_early, at_end
        self.written: list[Path] = []

    @rank_zero_only
    def _render(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str | None = None) -> None:
        step = trainer.global_step
        module = ema_module(trainer, pl_module)
        path = figure_path(trainer.default_root_dir, self.kind, step)
        if tag:
            path = path.with_name(f"{tag}.png")
        render_grid(module, path, self.n_cols, self.guidance_scale, self.seed, guidance=self.guidance)
        self.written.append(path)
        g = module.guidance_settings(self.guidance)
        scale = self.guidance_scale if self.guidance_scale is not None else g["scale"]
        log_image(trainer, f"samples/{self.kind}", path, step,
                  caption=f"step {step}, guidance {g.get('method', 'cfg')} {scale}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        if getattr(self, "_last_step", -1) != step and is_scheduled(step, self.every_n_steps, self.dense_early):
            self._last_step = step
            self._render(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self._render(trainer, pl_module, tag="final")
