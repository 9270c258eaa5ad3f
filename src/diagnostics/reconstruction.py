"""Noise real data to chosen levels and denoise it back with DDIM: what the model keeps per level."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from difflab.diagnostics.figures import column_block, labelled_mosaic
from difflab.diffusion.guidance import CFG
from difflab.diffusion.objectives import add_noise
from difflab.diffusion.samplers import ddim
from difflab.metrics.lpips_metric import lpips_distance


def check_fraction(fraction: float) -> float:
    """A start level as a fraction of the way from data (0) to noise (1) of the process's time."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"reconstruction t_fractions must lie in [0, 1] (0 = data, 1 = noise); got {fraction}")
    return float(fraction)


@torch.no_grad()
def reconstruct(
    module,
    x0: torch.Tensor,
    raw,
    fractions: Sequence[float],
    noise: torch.Tensor,
    steps: int = 10,
    guidance_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Noise x0 (model space: latents for latent models) to each level in ``fractions`` and denoise it back with
    deterministic DDIM started there, on the grid of a ``steps``-step sampler (a start halfway uses about half of them).

    Returns (x_t, reconstructions, start times): ``len(fractions) * B`` samples ordered level-major; every level uses
    the same noise.
    """
    cond = module.diffusion.condition(raw)
    null = module.diffusion.condition(module.diffusion.null_condition(raw)) if raw is not None else None
    # scale 1 is the plain conditional model for every guidance (autoguidance_cfg's own scale 1 keeps its CFG term)
    plain = CFG(scale=1.0) if guidance_scale == 1.0 else None
    model_fn = module.diffusion.model_fn(module, cond, null, guidance_scale, guidance=plain)
    process = module.diffusion.process
    noised, recs, starts = [], [], []
    for frac in fractions:
        t = process.time_at_fraction(check_fraction(frac))
        alpha, sigma = process.coefficients_like(torch.full((x0.shape[0],), t, dtype=torch.float64), x0)
        x_t = add_noise(x0, noise, alpha, sigma)
        noised.append(x_t)
        recs.append(ddim(model_fn, x_t, process, steps=steps, start=t))
        starts.append(t)
    return torch.cat(noised), torch.cat(recs), starts


def reconstruction_sweep(
    module,
    batch: dict,
    t_fractions: Sequence[float],
    path: Path,
    steps: int = 10,
    guidance_scale: float = 1.0,
    seed: int = 0,
    lpips_model=None,
) -> dict[str, float]:
    """Draw the sweep figure for a real ``batch`` and return per-level MSE (and LPIPS) scalars.

    ``steps`` is the DDIM step count of a full trajectory from pure noise; the same noise is used at every level, so
    rows differ only in the noise level.
    """
    was_training = module.training
    module.eval()
    device = module.device
    x0 = batch["x"].to(device)
    raw = module.diffusion.batch_condition(batch)  # labels, prompts (also labels mapped to prompts), or None
    raw = raw.to(device) if torch.is_tensor(raw) else (None if raw is None else list(raw))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    x_t, rec, starts = reconstruct(module, x0, raw, t_fractions, noise, steps, guidance_scale)
    with torch.no_grad():
        original = module.diffusion.to_pixels(x0).clamp(-1, 1)
        noised, rec = module.diffusion.to_pixels(x_t).clamp(-1, 1), module.diffusion.to_pixels(rec).clamp(-1, 1)
    module.train(was_training)
    n = x0.shape[0]
    scalars, labels = {}, []
    for i, (frac, t) in enumerate(zip(t_fractions, starts)):
        labels.append(f"{float(frac):.2f} (t={t:.4g})")
        rec_i = rec[i * n : (i + 1) * n]
        name = f"t{float(frac):.2f}"
        scalars[f"recon/mse_{name}"] = float(((rec_i - original) ** 2).flatten(1).mean(1).mean())
        if lpips_model is not None:
            scalars[f"recon/lpips_{name}"] = float(lpips_distance(lpips_model, rec_i, original).mean())
    blocks = [
        column_block(original.repeat(len(starts), *([1] * (original.ndim - 1))), ncol=n),
        column_block(noised, ncol=n),
        column_block(rec, ncol=n),
    ]
    labelled_mosaic(
        blocks,
        ["original", "noised x_t", "reconstruction"],
        labels,
        path,
        title=f"reconstruction from x_t ({module.diffusion.process.name}, DDIM {steps} steps from noise, "
        f"guidance {guidance_scale:g})",
    )
    return scalars
