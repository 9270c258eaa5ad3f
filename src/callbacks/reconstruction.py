"""Reconstruction from x_t: noise a fixed batch of real data to a time t and denoise it back with DDIM.

A sweep over several noise levels (default fractions 0.7, 0.5, 0.3, 0.2 of the way from data to noise in the
process's own time) is one figure, one row per level: original | noised x_t | reconstruction. The research log used
it to separate "the denoiser works" (reconstructions look right) from "sampling from pure noise fails" (a schedule /
terminal-SNR problem). Logged scalars: the pixel MSE between original and reconstruction per level
(``recon/mse_t0.70``), and LPIPS per level when an LPIPS backbone is available. The noising, the guided model function
and the sampler (started from the intermediate time) are the library's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from difflab.callbacks.figures import DiagnosticCallback, column_block, fixed_real_batch, labelled_mosaic
from difflab.diffusion.objectives import add_noise
from difflab.diffusion.samplers import ddim


def check_fraction(fraction: float) -> float:
    """A start level as a fraction of the way from data (0) to noise (1) of the process's time."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"reconstruction t_fractions must lie in [0, 1] (0 = data, 1 = noise); got {fraction}")
    return float(fraction)


@torch.no_grad()
def reconstruct(module, x0: torch.Tensor, raw, fractions: Sequence[float], noise: torch.Tensor, steps: int = 10,
                guidance_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Noise x0 (model space: latents for latent models) to each level in ``fractions`` and denoise it back with
    deterministic DDIM started there, on the grid of a ``steps``-step sampler (a start halfway uses about half of them).

    Returns (x_t, reconstructions, start times): ``len(fractions) * B`` samples ordered level-major; every level uses
    the same noise.
    """
    cond = module.diffusion.condition(raw)
    null = module.diffusion.condition(module.diffusion.null_condition(raw)) if raw is not None else None
    model_fn = module.diffusion.model_fn(module, cond, null, guidance_scale)
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


def reconstruction_sweep(module, batch: dict, t_fractions: Sequence[float], path: Path, steps: int = 10,
                         guidance_scale: float = 1.0, seed: int = 0, lpips_model=None) -> dict[str, float]:
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
        rec_i = rec[i * n:(i + 1) * n]
        name = f"t{float(frac):.2f}"
        scalars[f"recon/mse_{name}"] = float(((rec_i - original) ** 2).flatten(1).mean(1).mean())
        if lpips_model is not None:
            from difflab.metrics.lpips_metric import lpips_distance

            scalars[f"recon/lpips_{name}"] = float(lpips_distance(lpips_model, rec_i, original).mean())
    blocks = [column_block(original.repeat(len(starts), *([1] * (original.ndim - 1))), ncol=n),
              column_block(noised, ncol=n), column_block(rec, ncol=n)]
    labelled_mosaic(blocks, ["original", "noised x_t", "reconstruction"], labels, path,
                    title=f"reconstruction from x_t ({module.diffusion.process.name}, DDIM {steps} steps from noise, "
                          f"guidance {guidance_scale:g})")
    return scalars


class ReconstructionCallback(DiagnosticCallback):
    """Reconstruction sweep of a fixed real validation batch, with EMA weights, on the diagnostics schedule.

    Args:
        t_fractions: start levels as fractions of the process's time from data (0) to noise (1), one row each.
        n_images: real images per row.
        steps: DDIM steps of a full trajectory from noise (a start halfway uses about half of them).
        guidance_scale: 1.0 reconstructs with the plain conditional model (no guidance).
        lpips_net / lpips_backbone: LPIPS per t when the backbone weights are available (missing: skipped with one
            warning); ``lpips_net: null`` turns it off.
    """

    kind = "reconstruction"

    def __init__(self, t_fractions: Sequence[float] = (0.7, 0.5, 0.3, 0.2), n_images: int = 6, steps: int = 8,
                 guidance_scale: float = 1.0, seed: int = 0, lpips_net: str | None = None,
                 lpips_backbone: str | None = None, every_n_steps: int = 1000, dense_early: bool = True,
                 at_end: bool = True):
        super().__init__(every_n_steps, dense_early, at_end)
        for f in t_fractions:
            check_fraction(f)  # validates the range early
        self.t_fractions, self.n_images, self.steps = list(t_fractions), int(n_images), int(steps)
        self.guidance_scale, self.seed = float(guidance_scale), int(seed)
        self.lpips_net, self.lpips_backbone = lpips_net, lpips_backbone
        self._batch: dict | None = None
        self._lpips = None
        self._lpips_tried = False

    def _lpips_model(self):
        if not self._lpips_tried and self.lpips_net:
            from difflab.metrics.sample_metrics import load_lpips

            self._lpips = load_lpips(self.lpips_net, self.lpips_backbone)
            self._lpips_tried = True
        return self._lpips

    def draw(self, module, path: Path, context: dict[str, Any]) -> dict[str, float]:
        if self._batch is None:
            self._batch = fixed_real_batch(context.get("datamodule"), self.n_images, split="val")
        return reconstruction_sweep(module, self._batch, self.t_fractions, path, self.steps, self.guidance_scale,
                                    self.seed, self._lpips_model())
