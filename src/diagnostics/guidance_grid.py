"""Fixed-noise samples at several guidance scales side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from difflab.diagnostics.class_grid import grid_conditions
from difflab.diagnostics.figures import column_block, labelled_mosaic
from difflab.metrics.common import warn_once
from difflab.utils.conditions import condition_key


def sample_at_scales(
    module, raw, noise: torch.Tensor, scales: Sequence[float], sampler=None, seed: int = 0, max_batch: int = 256
) -> list[torch.Tensor]:
    """Samples for the same (raw, noise) at each guidance scale; scales share one batched sampling run when the
    module takes per-sample scales (no per-class table) and the batch stays under ``max_batch``."""
    n = noise.shape[0]
    per_call = max(1, max_batch // max(1, n))
    batchable = not module.diffusion.guidance.per_class
    out: list[torch.Tensor] = []
    groups = [scales[i : i + per_call] for i in range(0, len(scales), per_call)] if batchable else [[s] for s in scales]
    for group in groups:
        k = len(group)
        raw_k = raw.repeat(k) if torch.is_tensor(raw) else list(raw) * k
        scale = (
            float(group[0])
            if k == 1
            else torch.tensor([float(s) for s in group]).repeat_interleave(n).to(module.device)
        )
        x = module.diffusion.sample(
            module,
            n * k,
            raw_k,
            sampler=sampler,
            guidance_scale=scale,
            noise=noise.repeat(k, *([1] * (noise.ndim - 1))),
            generator=torch.Generator().manual_seed(seed + 1),
        )
        out.extend(x.chunk(k))
    return out


def guidance_grid(
    module,
    path: Path,
    scales: Sequence[float] = (1.0, 3.0, 6.0, 9.0),
    n_cols: int = 4,
    max_rows: int = 10,
    sampler=None,
    seed: int = 0,
) -> dict[str, float] | None:
    """Draw one panel per guidance scale (rows: classes / prompts, columns: fixed noise); None if unconditional."""
    if condition_key(module) is None:
        warn_once(
            "guidance-grid-uncond",
            "guidance grid skipped: the model is unconditional (guidance needs a "
            "condition); remove callbacks.guidance_grid",
        )
        return None
    raw, titles = grid_conditions(module, n_cols)
    titles = titles[:-1][:max_rows]  # conditional rows only: guidance does nothing to the unconditional row
    n_rows = len(titles)
    raw = raw[: n_rows * n_cols]
    noise = torch.randn((n_cols, *module.diffusion.sample_shape), generator=torch.Generator().manual_seed(seed))
    noise = noise.repeat(n_rows, *([1] * len(module.diffusion.sample_shape)))
    samples = sample_at_scales(module, raw, noise, scales, sampler, seed)
    blocks = [column_block(x, ncol=n_cols) for x in samples]
    stds = {f"guidance/sample_std_s{float(s):g}": float(x.float().std()) for s, x in zip(scales, samples)}
    labelled_mosaic(
        blocks,
        [f"guidance {float(s):g}" for s in scales],
        titles,
        path,
        title=f"fixed-seed samples vs guidance scale ({module.diffusion.describe_sampler(sampler)})",
    )
    return stds
