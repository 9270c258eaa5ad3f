"""Video sample grids: one row per prompt (plus an unconditional row), written as MP4 and GIF and sent to loggers.

The same fixed noise is used in each column, so rows differ only by their prompt and successive grids of one run
are comparable. Sampling uses the EMA weights (`ema_module`). Loggers: W&B gets the MP4 (``wandb.Video``),
TensorBoard gets the GIF as an animated image summary (the record ``SummaryWriter.add_video`` writes, without its
moviepy dependency), CSV gets the file paths in ``figures.csv``.

The grid itself is drawn by ``difflab.diagnostics.video_grid`` (also ``sample.py``'s ``write_sample_videos``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from difflab.callbacks.schedule import is_scheduled
from difflab.diagnostics.video_grid import sample_video_grid, upscale_factor, upscale_frames, write_video_files
from difflab.ops.atomic import write_text
from difflab.ops.ema_weights import ema_module, prepare_ema_weights
from difflab.utils.logging import append_figure_index, figure_path
from difflab.video.io import to_uint8_video, video_grid

log = logging.getLogger(__name__)


def log_video(trainer: L.Trainer, key: str, files: dict[str, Path], step: int, caption: str | None = None) -> None:
    """Send written video files to every logger that can show them (MP4 to W&B, GIF to TensorBoard, paths to CSV)."""
    for logger in trainer.loggers:
        name = type(logger).__name__
        try:
            if name == "TensorBoardLogger" and "gif" in files:
                _tensorboard_gif(logger.experiment, key, files["gif"], step)
            elif name == "WandbLogger" and ("mp4" in files or "gif" in files):
                path = files.get("mp4") or files["gif"]
                logger.log_video(key=key, videos=[str(path)], step=step, caption=[caption or ""])
            elif name == "CSVLogger":
                for fmt, path in files.items():
                    append_figure_index(Path(logger.log_dir), f"{key}.{fmt}", step, path)
        except Exception as err:  # a logger failing must not stop training
            log.warning("could not log video %s to %s: %s", key, name, err)


def _tensorboard_gif(writer, tag: str, gif_path: Path, step: int) -> None:
    """An animated GIF as a TensorBoard image summary (TensorBoard's image tab plays GIFs)."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    data = Path(gif_path).read_bytes()
    with Image.open(gif_path) as im:
        w, h = im.size
        channels = 1 if im.mode == "L" else 3
    image = Summary.Image(height=h, width=w, colorspace=channels, encoded_image_string=data)
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    writer.flush()


class VideoGridCallback(L.Callback):
    """Every ``every_n_steps`` (and at the end) sample a fixed-noise video grid with EMA weights, a row per prompt.

    Files: ``<run>/figures/video_grid/step_XXXXXXX.{mp4,gif}`` (``final.{mp4,gif}`` at the end) and
    ``...prompts.txt`` with the row titles. Clips smaller than ``min_size`` are upscaled (nearest neighbour, an
    integer factor). ``sampler_steps`` makes the grid cheaper than the model's own sampler
    (e.g. 25 DDIM steps); null keeps the model's sampler.
    """

    samples_ema_weights = True  # difflab.ops.ema_weights: draws from the EMA weights

    def __init__(
        self,
        every_n_steps: int = 1000,
        n_cols: int = 4,
        max_prompts: int = 8,
        include_uncond: bool = True,
        seed: int = 0,
        guidance_scale: float | None = None,
        fps: float = 8.0,
        min_size: int = 64,
        formats: Sequence[str] = ("mp4", "gif"),
        sampler_steps: int | None = None,
        dense_early: bool = False,
        at_end: bool = True,
        kind: str = "video_grid",
    ):
        if n_cols < 1:
            raise ValueError(f"video grid n_cols must be >= 1, got {n_cols}")
        if fps <= 0:
            raise ValueError(f"video grid fps must be positive, got {fps}")
        self.every_n_steps, self.n_cols, self.max_prompts = int(every_n_steps), int(n_cols), int(max_prompts)
        self.include_uncond, self.seed, self.guidance_scale = include_uncond, seed, guidance_scale
        self.fps, self.min_size, self.formats = float(fps), int(min_size), tuple(formats)
        self.sampler_steps, self.dense_early, self.at_end, self.kind = sampler_steps, dense_early, at_end, kind
        self.written: list[dict[str, Path]] = []
        self._last_step = -1

    def render(self, module, stem: Path) -> dict[str, Any]:
        """Sample the grid with ``module`` and write ``stem``.{mp4,gif,prompts.txt}; returns paths and titles."""
        sampler = None
        if self.sampler_steps:
            sampler = functools.partial(module.diffusion.sampler, steps=int(self.sampler_steps))
        x, titles = sample_video_grid(
            module, self.n_cols, self.max_prompts, self.include_uncond, self.seed, self.guidance_scale, sampler
        )
        k = upscale_factor(x.shape[-2:], self.min_size)
        frames = upscale_frames(video_grid(to_uint8_video(x), nrow=self.n_cols), k)
        files = write_video_files(frames, stem, self.fps, self.formats)
        write_text(stem.with_name(stem.name + ".prompts.txt"), "\n".join(titles) + "\n")
        return {"files": files, "titles": titles, "samples": x}

    @rank_zero_only
    def _render(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str | None = None) -> None:
        step = trainer.global_step
        module = ema_module(trainer, pl_module)
        stem = figure_path(trainer.default_root_dir, self.kind, step, "")
        if tag:
            stem = stem.with_name(tag)
        out = self.render(module, stem)
        self.written.append(out["files"])
        scale = self.guidance_scale if self.guidance_scale is not None else module.diffusion.guidance.scale
        caption = f"step {step}, guidance {scale}; rows: " + " | ".join(out["titles"])
        log_video(trainer, f"samples/{self.kind}", out["files"], step, caption)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        if self._last_step != step and is_scheduled(step, self.every_n_steps, self.dense_early):
            self._last_step = step
            prepare_ema_weights(trainer, pl_module)  # every rank: under FSDP they gather the EMA weights together
            self._render(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.at_end:
            return
        if self._last_step == trainer.global_step and self.written:
            self._copy_final(trainer)  # the grid of this very step exists: do not sample it again
        else:
            prepare_ema_weights(trainer, pl_module)
            self._render(trainer, pl_module, tag="final")

    @rank_zero_only
    def _copy_final(self, trainer) -> None:
        import shutil

        files = {}
        for fmt, path in self.written[-1].items():
            files[fmt] = path.with_name("final" + path.suffix)
            shutil.copyfile(path, files[fmt])
        prompts = self.written[-1][next(iter(self.written[-1]))].with_suffix(".prompts.txt")
        if prompts.is_file():
            shutil.copyfile(prompts, prompts.with_name("final.prompts.txt"))
        self.written.append(files)
