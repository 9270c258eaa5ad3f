"""The denoising trajectory: the sampler's x0 prediction at chosen steps, one row per condition."""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.diagnostics.figures import column_block, labelled_mosaic
from difflab.utils.conditions import condition_key


def collage_conditions(module, max_rows: int, n_uncond: int = 1):
    """Raw conditions (one per row) and their titles: every class (up to max_rows) or prompt, plus unconditional."""
    key = condition_key(module)
    if key == "label":
        k = min(module.conditioner.num_classes, max_rows)
        names = module.diffusion.class_names or [str(i) for i in range(module.conditioner.num_classes)]
        raw = torch.tensor(list(range(k)) + [module.conditioner.null_index] * n_uncond, device=module.device)
        return raw, names[:k] + ["(uncond)"] * n_uncond
    if key == "text":
        prompts = list(module.diffusion.prompts or [])[:max_rows]
        return prompts + [""] * n_uncond, prompts + ["(uncond)"] * n_uncond
    return None, ["(uncond)"] * max(1, n_uncond)


class TrajectoryRecorder:
    """Wraps a sampler so that every ``model_fn(x_t, t)`` call records (t, x_t, x0_hat) on the CPU."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.calls: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    def __call__(self, model_fn, x, process, **kwargs):
        def recording(x_t, t):
            x0, eps = model_fn(x_t, t)
            self.calls.append((float(t), x_t.detach().cpu(), x0.detach().cpu()))
            return x0, eps

        return self.sampler(recording, x, process, **kwargs)


def pick_columns(n_calls: int, n_columns: int) -> list[int]:
    """Indices of ``n_columns`` calls spread evenly over ``n_calls`` (always the first and the last)."""
    if n_calls <= n_columns:
        return list(range(n_calls))
    return sorted({round(i * (n_calls - 1) / (n_columns - 1)) for i in range(n_columns)})


def denoise_collage(
    module,
    path: Path,
    n_columns: int = 8,
    max_rows: int = 10,
    n_uncond: int = 1,
    guidance_scale: float | None = None,
    sampler=None,
    seed: int = 0,
) -> dict[str, float]:
    """Sample one trajectory per row with fixed noise and draw x_t / x0_hat at ``n_columns`` points along it."""
    raw, titles = collage_conditions(module, max_rows, n_uncond)
    n = len(titles)
    recorder = TrajectoryRecorder(sampler or module.diffusion.sampler)
    noise = torch.randn((n, *module.diffusion.sample_shape), generator=torch.Generator().manual_seed(seed))
    final = module.diffusion.sample(
        module,
        n,
        raw,
        sampler=recorder,
        guidance_scale=guidance_scale,
        noise=noise,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    cols = pick_columns(len(recorder.calls), n_columns)
    decode = module.diffusion.to_pixels if module.diffusion.autoencoder is not None else (lambda z: z)
    blocks, heads = [], []
    for c in cols:
        t, x_t, x0 = recorder.calls[c]
        with torch.no_grad():
            x_t_px = decode(x_t.to(module.device)).clamp(-1, 1)
            x0_px = decode(x0.to(module.device)).clamp(-1, 1)
        pairs = torch.stack([x_t_px, x0_px], dim=1).flatten(0, 1)  # row order: class0 x_t, class0 x0, class1 ...
        blocks.append(column_block(pairs, ncol=1))
        heads.append(f"t={t:.4g}")
    blocks.append(column_block(torch.stack([final, final], dim=1).flatten(0, 1), ncol=1))
    heads.append("final")
    rows = [f"{name} {kind}" for name in titles for kind in ("x_t", "x0_hat")]
    scale = module.diffusion.guidance.scale if guidance_scale is None else guidance_scale
    labelled_mosaic(
        blocks,
        heads,
        rows,
        path,
        title=f"denoising trajectory ({module.diffusion.describe_sampler(sampler)}, guidance {scale:g})",
        cell_px=40,
    )
    return {}
