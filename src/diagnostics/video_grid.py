"""The video grid: fixed-noise clips per prompt, written as MP4 / GIF files."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from difflab.ops.atomic import write_text
from difflab.trust import not_a_link
from difflab.video.io import to_uint8_video, video_grid, write_gif, write_mp4


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


def write_video_files(
    frames: np.ndarray, stem: str | Path, fps: float, formats: Sequence[str] = ("mp4", "gif")
) -> dict[str, Path]:
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
def sample_video_grid(
    module,
    n_cols: int = 4,
    max_prompts: int = 8,
    include_uncond: bool = True,
    seed: int = 0,
    guidance_scale: float | None = None,
    sampler=None,
) -> tuple[torch.Tensor, list[str]]:
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
    x = module.diffusion.sample(
        module,
        n_rows * n_cols,
        raw,
        sampler=sampler,
        guidance_scale=guidance_scale,
        noise=noise,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    if x.ndim != 5:
        raise ValueError(f"the video grid needs a video model (samples B x C x T x H x W), got {tuple(x.shape)}")
    return x, titles


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


def write_sample_videos(
    out_dir: str | Path,
    samples: torch.Tensor,
    raw=None,
    fps: float = 8.0,
    max_per_row: int = 8,
    max_rows: int = 16,
    min_size: int = 64,
) -> dict[str, Path]:
    """``videos.mp4`` / ``videos.gif`` in ``out_dir``: one row per distinct condition (prompt or label) in order of
    first appearance, up to ``max_per_row`` samples each (short rows padded with black), and ``videos.txt`` with
    the row titles. ``samples``: ``N x C x T x H x W`` in [-1, 1]. Returns {mp4, gif, titles: path}."""
    if samples.ndim != 5:
        raise ValueError(f"write_sample_videos needs N x C x T x H x W samples, got {tuple(samples.shape)}")
    u8 = to_uint8_video(samples)  # N x T x H x W x C
    keys = (
        ["samples"] * len(u8)
        if raw is None
        else [
            str(int(r)) if isinstance(raw, torch.Tensor) else str(r)
            for r in (raw.tolist() if isinstance(raw, torch.Tensor) else raw)
        ]
    )
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
