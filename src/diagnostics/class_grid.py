"""The class / prompt grid: fixed-noise samples, one row per condition, optionally scored by a judge."""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.diagnostics.figures import captioned_grid
from difflab.eval.grid_judge import agreement_rate
from difflab.utils.conditions import condition_key
from difflab.utils.images import auto_upscale, make_grid, save_png, to_uint8


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


def sample_grid(
    module, n_cols: int = 8, guidance_scale=None, seed: int = 0, sampler=None, guidance: dict | None = None
):
    """The fixed-noise grid samples (one row per class / prompt, then the unconditional row; the same noise in each
    column), with the raw conditions and row titles."""
    raw, titles = grid_conditions(module, n_cols)
    n_rows = len(titles) if raw is not None else 4
    g = torch.Generator().manual_seed(seed)
    shape = module.diffusion.sample_shape
    noise = torch.randn((n_cols, *shape), generator=g).repeat(n_rows, *([1] * len(shape)))
    x = module.diffusion.sample(
        module,
        n_rows * n_cols,
        raw,
        sampler=sampler,
        guidance_scale=guidance_scale,
        noise=noise,
        generator=torch.Generator().manual_seed(seed + 1),
        guidance=guidance,
    )
    if x.ndim == 5:  # videos: show the middle frame in the still grid
        x = x[:, :, x.shape[2] // 2]
    return x, raw, titles


def render_grid(
    module,
    out_path: Path,
    n_cols: int = 8,
    guidance_scale=None,
    seed: int = 0,
    sampler=None,
    guidance: dict | None = None,
) -> Path:
    """Sample the class/prompt grid with fixed noise and write it as a PNG; returns the path. ``guidance``:
    overrides of the module's guidance settings (e.g. ``{"method": "apg"}``)."""
    x, _, _ = sample_grid(module, n_cols, guidance_scale, seed, sampler, guidance)
    grid = make_grid(to_uint8(x), nrow=n_cols)
    return save_png(grid, out_path, upscale=auto_upscale(x.shape[-1], 64))


def score_grid(judge, x: torch.Tensor, titles: list[str], n_cols: int, as_prompts: bool = False):
    """Judge every cell of a grid from ``sample_grid``: (captions, colours, agreement rate over the conditional
    rows). A cell is green when the judge's prediction is its row's class / prompt, red when not, grey in the
    unconditional row."""
    candidates = titles[:-1]  # the last row is "(uncond)"
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


def render_scored_grid(
    module,
    judge,
    out_path: Path,
    n_cols: int = 8,
    guidance_scale=None,
    seed: int = 0,
    sampler=None,
    guidance: dict | None = None,
) -> tuple[Path, float]:
    """The class grid with each cell labelled by ``judge`` (predicted class and score); returns the PNG's path and
    the agreement rate (fraction of conditional cells showing their requested class)."""
    x, raw, titles = sample_grid(module, n_cols, guidance_scale, seed, sampler, guidance)
    if raw is None:
        raise ValueError("a scored grid needs a class- or text-conditioned model")
    captions, colours, agreement = score_grid(judge, x, list(titles), n_cols, condition_key(module) == "text")
    title = f"judge: {judge.name}; agreement {agreement:.0%} of {(len(titles) - 1) * n_cols} conditional cells"
    path = captioned_grid(x, n_cols, captions, colours, list(titles), out_path, title=title)
    return path, agreement
