"""Judge moving-digits videos (real or generated): is the named digit there, and does it move the named way?

Digit: in every frame the digit is cut out by a ``digit_size`` square window centred on the bounding box of its
bright pixels, resized to 16x16 and classified by the bundled digit classifier (`difflab.eval.digit_classifier`),
whose training images are the same scikit-learn digits upsampled to 16x16. Motion: the per-frame centre of mass
of the bright pixels (background level removed) is fitted by a straight line; its dominant axis and sign give the
direction, and the fitted displacement over the clip must cover at least ``min_travel`` of the distance a real
clip travels (``frame size - digit size``), so a digit that only jitters does not count as moving.

`evaluate_videos` reports per prompt: the fraction of frames showing the named digit, the fraction of samples
whose majority of frames show it, the fraction of samples moving the named direction, and pass/fail
(digit in most frames AND most samples move the right way).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from difflab.datamodules.moving_digits import DIRECTIONS, parse_caption, read_manifest
from difflab.datamodules.sign_video import HOW2SIGN_CLIPS_DIR
from difflab.eval.digit_classifier import judge
from difflab.utils.errors import DataNotFoundError
from difflab.video.io import read_video

CROP_MODES = ("bbox", "com", "whole")
_AXIS = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}  # (axis: 0 rows / 1 cols, sign)


def to_grey01(videos) -> torch.Tensor:
    """Videos as float ``N x T x H x W`` in [0, 1] from uint8 ``N x T x H x W (x C)`` / ``N x T x C x H x W``
    (sample.py's layout) or model-space float ``N x C x T x H x W`` in [-1, 1]."""
    v = (
        torch.from_numpy(np.ascontiguousarray(videos))
        if not isinstance(videos, torch.Tensor)
        else videos.detach().cpu()
    )
    if v.dtype == torch.uint8:
        v = v.float() / 255.0
        if v.ndim == 5 and v.shape[2] in (1, 3) and v.shape[-1] not in (1, 3):  # N x T x C x H x W
            return v.mean(2)
        return v.mean(-1) if v.ndim == 5 else v
    if v.ndim != 5:
        raise ValueError(f"float videos must be N x C x T x H x W in [-1, 1], got shape {tuple(v.shape)}")
    return ((v.float().clamp(-1, 1) + 1) / 2).mean(1)


def foreground(frames: torch.Tensor) -> torch.Tensor:
    """Bright content of ``... x H x W`` frames in [0, 1]: each frame minus its median (the background), >= 0."""
    med = frames.flatten(-2).median(dim=-1).values[..., None, None]
    return (frames - med).clamp(min=0)


def centres_of_mass(fg: torch.Tensor) -> torch.Tensor:
    """``N x T x 2`` (row, col) intensity centres of ``N x T x H x W`` foreground frames (frame centre if empty)."""
    n, t, h, w = fg.shape
    mass = fg.sum((-1, -2))
    rows = (fg.sum(-1) * torch.arange(h, dtype=fg.dtype)).sum(-1)
    cols = (fg.sum(-2) * torch.arange(w, dtype=fg.dtype)).sum(-1)
    empty = mass <= 1e-6
    com = torch.stack([rows / mass.clamp(min=1e-6), cols / mass.clamp(min=1e-6)], -1)
    com[empty] = torch.tensor([(h - 1) / 2, (w - 1) / 2], dtype=fg.dtype)
    return com


def bbox_centres(fg: torch.Tensor, rel_threshold: float = 0.25) -> torch.Tensor:
    """``N x T x 2`` centres of the bounding box of pixels above ``rel_threshold`` x the frame's maximum."""
    n, t, h, w = fg.shape
    peak = fg.flatten(-2).max(-1).values[..., None, None]
    on = (fg > rel_threshold * peak) & (peak > 1e-6)
    rows_on, cols_on = on.any(-1), on.any(-2)
    r = torch.arange(h).expand_as(rows_on)
    c = torch.arange(w).expand_as(cols_on)
    big = 10**6
    r0 = torch.where(rows_on, r, big).min(-1).values
    r1 = torch.where(rows_on, r, -big).max(-1).values
    c0 = torch.where(cols_on, c, big).min(-1).values
    c1 = torch.where(cols_on, c, -big).max(-1).values
    centre = torch.stack([(r0 + r1) / 2.0, (c0 + c1) / 2.0], -1).float()
    empty = ~rows_on.any(-1)
    centre[empty] = torch.tensor([(h - 1) / 2, (w - 1) / 2])
    return centre


def digit_crops(frames: torch.Tensor, digit_size: int, mode: str = "bbox", out: int = 16) -> torch.Tensor:
    """``(N*T) x 1 x out x out`` crops in [-1, 1] of ``N x T x H x W`` frames in [0, 1] for the classifier.

    ``bbox``: ``digit_size`` window centred on the bright pixels' bounding box; ``com``: centred on their centre of
    mass; ``whole``: the whole frame (for clips where the digit fills the frame).
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")
    n, t, h, w = frames.shape
    flat = frames.reshape(n * t, 1, h, w)
    if mode == "whole":
        crops = flat
    else:
        fg = foreground(frames)
        centre = (bbox_centres(fg) if mode == "bbox" else centres_of_mass(fg)).reshape(n * t, 2)
        d = int(digit_size)
        top_left = torch.round(centre - (d - 1) / 2).long()
        pad = F.pad(flat, (d, d, d, d))  # black outside the frame
        rows = (top_left[:, 0] + d)[:, None] + torch.arange(d)[None]  # (N*T) x d
        cols = (top_left[:, 1] + d)[:, None] + torch.arange(d)[None]
        rows, cols = rows.clamp(0, h + 2 * d - 1), cols.clamp(0, w + 2 * d - 1)
        idx = torch.arange(n * t)[:, None, None]
        crops = pad[:, 0][idx, rows[:, :, None], cols[:, None, :]][:, None]
    crops = F.interpolate(crops, size=(out, out), mode="bilinear", align_corners=False)
    return crops * 2 - 1


@torch.no_grad()
def classify_frames(frames: torch.Tensor, digit_size: int, mode: str = "bbox", model=None) -> torch.Tensor:
    """Predicted digit for every frame: ``N x T`` int64, for ``N x T x H x W`` frames in [0, 1]."""
    n, t = frames.shape[:2]
    return judge(digit_crops(frames, digit_size, mode), model=model)["pred"].reshape(n, t)


def motion(frames: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Estimated direction per video and the fitted displacement (rows, cols) over the clip, ``N x 2`` pixels.

    A least-squares line through the per-frame centres of mass is less sensitive to one bad frame than
    last-minus-first.
    """
    com = centres_of_mass(foreground(frames))  # N x T x 2
    n, t, _ = com.shape
    tt = torch.arange(t, dtype=com.dtype)
    tc = tt - tt.mean()
    slope = (tc[None, :, None] * (com - com.mean(1, keepdim=True))).sum(1) / (tc.pow(2).sum() + 1e-9)
    disp = slope * (t - 1)
    dirs = []
    for dr, dc in disp.tolist():
        if abs(dc) >= abs(dr):
            dirs.append("right" if dc > 0 else "left")
        else:
            dirs.append("down" if dr > 0 else "up")
    return dirs, disp


def evaluate_videos(
    videos,
    prompts: Sequence[str],
    digit_size: int,
    canvas_size: int | None = None,
    mode: str = "bbox",
    min_travel: float = 0.25,
    model=None,
) -> dict:
    """Per-prompt digit and motion scores for moving-digit videos with their captions.

    ``videos``: any layout `to_grey01` accepts; ``digit_size`` and ``canvas_size`` are the generator's (pixels of
    the stored clips); frames of another size are judged with the digit size scaled to them. Returns
    ``{"per_prompt": {prompt: {...}}, "overall": {...}}``.
    """
    frames = to_grey01(videos)
    n, t, h, w = frames.shape
    if len(prompts) != n:
        raise ValueError(f"got {n} videos but {len(prompts)} prompts")
    parsed = [parse_caption(p) for p in prompts]
    bad = [p for p, q in zip(prompts, parsed) if q is None]
    if bad:
        raise ValueError(f"not moving-digits captions (expected 'the digit three moving left'): {bad[:3]}")
    scale = h / float(canvas_size or h)
    d = max(2, int(round(digit_size * scale)))
    preds = classify_frames(frames, d, mode, model)
    dirs, disp = motion(frames)
    travel = max(h, w) - d
    per_prompt: dict[str, dict] = {}
    for prompt in dict.fromkeys(prompts):
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        digit, direction = parse_caption(prompt)
        axis, sign = _AXIS[direction]
        hit = (preds[idx] == digit).float()  # samples x T
        along = torch.tensor([float(disp[i, axis]) * sign for i in idx])
        moved = torch.tensor([dirs[i] == direction for i in idx]) & (along >= min_travel * travel)
        frame_acc = hit.mean().item()
        majority = (hit.mean(1) > 0.5).float().mean().item()
        direction_acc = moved.float().mean().item()
        per_prompt[prompt] = {
            "digit": digit,
            "direction": direction,
            "n": len(idx),
            "digit_frame_acc": frame_acc,
            "digit_majority": majority,
            "direction_acc": direction_acc,
            "mean_displacement": along.mean().item(),
            "expected_displacement": float(travel),
            "passed": bool(frame_acc > 0.5 and direction_acc > 0.5),
            "predicted_directions": {k: sum(dirs[i] == k for i in idx) for k in DIRECTIONS},
        }
    rows = list(per_prompt.values())
    overall = {
        "prompts": len(rows),
        "prompts_passed": sum(r["passed"] for r in rows),
        "videos": n,
        "digit_frame_acc": float(np.mean([r["digit_frame_acc"] for r in rows])),
        "direction_acc": float(np.mean([r["direction_acc"] for r in rows])),
        "crop_mode": mode,
        "digit_size_px": d,
        "frame_size": [h, w],
    }
    return {"per_prompt": per_prompt, "overall": overall}


def format_report(result: dict) -> str:
    """A plain-text table of `evaluate_videos` results (one line per prompt plus a summary)."""
    lines = [
        f"{'prompt':34s} {'n':>3s} {'digit/frame':>11s} {'digit/maj':>9s} {'direction':>9s} "
        f"{'disp px':>8s} {'pass':>5s}"
    ]
    for prompt, r in result["per_prompt"].items():
        lines.append(
            f"{prompt:34s} {r['n']:3d} {r['digit_frame_acc']:11.2f} {r['digit_majority']:9.2f} "
            f"{r['direction_acc']:9.2f} {r['mean_displacement']:8.1f} {'yes' if r['passed'] else 'NO':>5s}"
        )
    o = result["overall"]
    lines.append(
        f"passed {o['prompts_passed']}/{o['prompts']} prompts; mean digit/frame {o['digit_frame_acc']:.2f}, "
        f"mean direction {o['direction_acc']:.2f} ({o['videos']} videos, crop={o['crop_mode']}, "
        f"digit {o['digit_size_px']} px in {o['frame_size'][0]}x{o['frame_size'][1]})"
    )
    return "\n".join(lines)


def load_real_clips(data_dir, split: str = "test", max_clips: int | None = None) -> tuple[np.ndarray, list[str], dict]:
    """Decoded clips of a generated moving-digits folder (uint8 ``N x T x H x W x 3``), their captions and the
    generator parameters, read through the manifest (to check the judge on real data)."""
    from pathlib import Path

    m = read_manifest(data_dir)
    if m is None:
        raise DataNotFoundError(
            f"{data_dir}: no moving-digits manifest.json; generate the data first "
            "(train once with datamodule=moving_digits, or difflab.datamodules.moving_digits."
            "generate_moving_digits)"
        )
    clips = [c for c in m["clips"] if c["split"] == split][:max_clips]
    folder = Path(data_dir) / HOW2SIGN_CLIPS_DIR.format(split=split)
    videos = np.stack([read_video(folder / f"{c['name']}.mp4") for c in clips])
    return videos, [c["text"] for c in clips], m["params"]


def digit_geometry(run_config: dict) -> tuple[int, int]:
    """``(digit_size, canvas_size)`` of the moving-digits data a checkpoint was trained on (from its run config)."""
    dm = (run_config or {}).get("datamodule") or {}
    if "digit_size" not in dm:
        raise ValueError(
            "this checkpoint was not trained on moving digits (its datamodule config has no digit_size); "
            "pass digit_size / canvas_size explicitly"
        )
    return int(dm["digit_size"]), int(dm.get("canvas_size") or dm["digit_size"])


@torch.no_grad()
def sample_prompts(
    module,
    prompts: Sequence[str],
    n_per_prompt: int = 8,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[torch.Tensor, list[str]]:
    """``n_per_prompt`` samples of each prompt (``N x C x T x H x W`` in [-1, 1], on the CPU) and their prompts."""
    import functools

    sampler = functools.partial(module.diffusion.sampler, steps=int(steps)) if steps else None
    raw = [p for p in prompts for _ in range(n_per_prompt)]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(raw), batch_size):
        chunk = raw[i : i + batch_size]
        noise = torch.randn((len(chunk), *module.diffusion.sample_shape), generator=gen)
        out.append(
            module.diffusion.sample(
                module, len(chunk), chunk, sampler=sampler, guidance_scale=guidance_scale, noise=noise, generator=gen
            ).cpu()
        )
    return torch.cat(out), raw
