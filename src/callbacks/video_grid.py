"""Video sample grids: one row per prompt (plus an unconditional row), written as MP4 and GIF and sent to loggers.

The same fixed noise is used in each column, so rows differ only by their prompt and successive grids of one run
are comparable. Sampling uses the EMA weights (`ema_module`). Loggers: W&B gets the MP4 (``wandb.Video``),
TensorBoard gets the GIF as an animated image summary (the record ``SummaryWriter.add_video`` writes, without its
moviepy dependency), CSV gets the file paths in ``figures.csv``.

`write_sample_videos` is the same grid for ``sample.py`` outputs (one row per distinct prompt).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from difflab.ops.ema_weights import ema_module, prepare_ema_weights
from difflab.callbacks.schedule import is_scheduled
from difflab.video.io import to_uint8_video, video_grid, write_gif, write_mp4
from difflab.ops.atomic import write_text
from difflab.trust import not_a_link
from difflab.utils.logging import append_figure_index, figure_path

log = logging.getLogger(__name__)


def grid_prompts(module, max_prompts: int = 8, include_uncond: bool = True) -> tuple[list[str] | None, list[str]]:
    """Row conditions and titles: the module's prompts (first ``max_prompts``) plus "" for the unconditional row.

    Class-conditional video models get one row per class; unconditional ones a single untitled row (None).
    """
    key = module.conditioner.batch_key
    if key == "text":
        prompts = list(module.diffusion.prompts or [])[:max_prompts]
        rows = prompts + ([""] if include_uncond or not prompts else [])
        return rows, [p if p else "(uncond)" for p in rows]
    if key == "label":
        k = min(module.conditioner.num_classes, max_prompts)
        titles = (module.diffusion.class_names or [str(i) for i in range(k)])[:k]
        return list(range(k)), list(titles)
    return None, ["samples"]


def upscale_factor(clip_hw: Sequence[int], min_size: int) -> int:
    """Integer factor that makes a clip's shorter side at least ``min_size`` (1 for clips already that large)."""
    return max(1, int(min_size) // max(1, min(int(v) for v in clip_hw)))


def upscale_frames(frames: np.ndarray, k: int) -> np.ndarray:
    """Nearest-neighbour integer upscaling of ``T x H x W x C`` frames by ``k`` (tiny 16x16 clips are unreadable
    in a player otherwise)."""
    return frames if k <= 1 else frames.repeat(k, axis=1).repeat(k, axis=2)


def write_video_files(frames: np.ndarray, stem: str | Path, fps: float,
                      formats: Sequence[str] = ("mp4", "gif")) -> dict[str, Path]:
    """Write uint8 ``T x H x W x C`` frames to ``<stem>.mp4`` / ``<stem>.gif``; returns {format: path}."""
    stem = Path(stem)
    out = {}
    for fmt in formats:  # the encoders open the path themselves: a symbolic link there is refused, not followed
        if fmt == "mp4":
            out["mp4"] = write_mp4(not_a_link(stem.with_suffix(".mp4")), frames, fps)
        elif fmt == "gif":
            out["gif"] = write_gif(not_a_link(stem.with_suffix(".gif")), frames, fps)
        else:
            raise ValueError(f"video format must be mp4 or gif, got {fmt!r}")
    return out


@torch.no_grad()
def sample_video_grid(module, n_cols: int = 4, max_prompts: int = 8, include_uncond: bool = True, seed: int = 0,
                      guidance_scale: float | None = None, sampler=None) -> tuple[torch.Tensor, list[str]]:
    """Samples ``rows x n_cols`` (row-major, one row per prompt, the same noise in every row) and the row titles."""
    rows, titles = grid_prompts(module, max_prompts, include_uncond)
    n_rows = len(titles)
    shape = tuple(module.diffusion.sample_shape)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n_cols, *shape), generator=g).repeat(n_rows, *([1] * len(shape)))
    if rows is None:
        raw = None
    elif isinstance(rows[0], int):
        raw = torch.tensor(rows, device=module.device).repeat_interleave(n_cols)
    else:
        raw = [r for r in rows for _ in range(n_cols)]
    x = module.diffusion.sample(module, n_rows * n_cols, raw, sampler=sampler, guidance_scale=guidance_scale, noise=noise,
                      generator=torch.Generator().manual_seed(seed + 1))
    if x.ndim != 5:
        raise ValueError(f"the video grid needs a video model (samples B x C x T x H x W), got {tuple(x.shape)}")
    return x, titles


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

    def __init__(self, every_n_steps: int = 1000, n_cols: int = 4, max_prompts: int = 8, include_uncond: bool = True,
                 seed: int = 0, guidance_scale: float | None = None, fps: float = 8.0, min_size: int = 64,
                 formats: Sequence[str] = ("mp4", "gif"), sampler_steps: int | None = None,
                 dense_early: bool = False, at_end: bool = True, kind: str = "video_grid"):
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
        x, titles = sample_video_grid(module, self.n_cols, self.max_prompts, self.include_uncond, self.seed,
                                      self.guidance_scale, sampler)
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


# ------------------------------------------------------------------------------------------------------ sample.py
def video_fps(run_config: dict | None, default: float = 8.0) -> float:
    """Playback frame rate of a video model's samples from its training config: the datamodule's ``fps``
    (moving digits), ``target_fps``, or 25 / ``frame_stride`` for PHOENIX; ``default`` otherwise."""
    dm = (run_config or {}).get("datamodule") or {}
    for key in ("fps", "target_fps"):
        if dm.get(key):
            return float(dm[key])
    if dm.get("dataset") == "phoenix":
        return 25.0 / max(1, int(dm.get("frame_stride") or 1))
    return float(default)


def write_sample_videos(out_dir: str | Path, samples: torch.Tensor, raw=None, fps: float = 8.0,
                        max_per_row: int = 8, max_rows: int = 16, min_size: int = 64) -> dict[str, Path]:
    """``videos.mp4`` / ``videos.gif`` in ``out_dir``: one row per distinct condition (prompt or label) in order of
    first appearance, up to ``max_per_row`` samples each (short rows padded with black), and ``videos.txt`` with
    the row titles. ``samples``: ``N x C x T x H x W`` in [-1, 1]. Returns {mp4, gif, titles: path}."""
    if samples.ndim != 5:
        raise ValueError(f"write_sample_videos needs N x C x T x H x W samples, got {tuple(samples.shape)}")
    u8 = to_uint8_video(samples)  # N x T x H x W x C
    keys = ["samples"] * len(u8) if raw is None else [str(int(r)) if isinstance(raw, torch.Tensor) else str(r)
                                                       for r in (raw.tolist() if isinstance(raw, torch.Tensor) else raw)]
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    titles = list(groups)[:max_rows]
    ncol = min(max_per_row, max(len(groups[k]) for k in titles))
    blank = np.zeros_like(u8[0])
    tiles = []
    for k in titles:
        idx = groups[k][:ncol]
        tiles += [u8[i] for i in idx] + [blank] * (ncol - len(idx))
    frames = upscale_frames(video_grid(np.stack(tiles), nrow=ncol), upscale_factor(u8.shape[2:4], min_size))
    out_dir = Path(out_dir)
    files = write_video_files(frames, out_dir / "videos", fps)
    files["titles"] = out_dir / "videos.txt"
    write_text(files["titles"], "\n".join(t if t else "(uncond)" for t in titles) + "\n")
    return files
