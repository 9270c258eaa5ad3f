"""Reconstruction from x_t: noise a fixed batch of real data to timestep t and denoise it back with DDIM.

A sweep over several t (default 0.7T, 0.5T, 0.3T, 0.2T) is one figure, one row per t: original | noised x_t |
reconstruction. The research log used it to separate "the denoiser works" (reconstructions look right) from
"sampling from pure noise fails" (a schedule / terminal-SNR problem). Logged scalars: the pixel MSE between
original and reconstruction per t (``recon/mse_t0.70``), and LPIPS per t when an LPIPS backbone is available.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from difflab.callbacks.figures import DiagnosticCallback, column_block, fixed_real_batch, labelled_mosaic
from difflab.diffusion.objectives import add_noise


def start_timestep(fraction: float, num_timesteps: int) -> int:
    """The training timestep for a fraction of T (0.7 -> 0.7 T), clamped to [0, T - 1]."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"reconstruction t_fractions must lie in [0, 1] (fractions of T); got {fraction}")
    return min(num_timesteps - 1, max(0, round(float(fraction) * num_timesteps)))


def row_timesteps(t_starts: Sequence[int], calls: Sequence[int]) -> torch.Tensor:
    """R x max(calls) descending timesteps: row r goes from t_starts[r] to 0 in calls[r] model calls.

    Rows are right-aligned (all end together) and padded with -1 in front, so every round evaluates only the rows
    still running: a sweep costs sum(calls) row-evaluations, not R x max(calls).
    """
    if len(t_starts) != len(calls):
        raise ValueError(f"row_timesteps: {len(t_starts)} start timesteps but {len(calls)} call counts")
    k = max(max(1, int(c)) for c in calls)
    out = torch.full((len(t_starts), k), -1, dtype=torch.long)
    for r, (t, c) in enumerate(zip(t_starts, calls)):
        c = max(1, int(c))
        out[r, k - c:] = torch.linspace(float(t), 0.0, c, dtype=torch.float64).round().long()
    return out


def _rows(cond: dict | None, idx: torch.Tensor) -> dict | None:
    return None if cond is None else {k: (None if v is None else v[idx]) for k, v in cond.items()}


def per_sample_model_fn(module, cond: dict, null: dict | None, scale: float):
    """``fn(x_t, t, idx) -> (x0_hat, eps_hat)`` with a timestep PER SAMPLE (``t``: long B) for the samples ``idx`` of
    the conditioning batch, as ``guided_model_fn``: CFG (+ the module's rescale), the objective's x0 clipping, eps
    recomputed from the clipped x0, float64 conversions."""
    from difflab.diffusion.guidance import cfg_combine, concat_cond, rescale_guidance
    from difflab.diffusion.objectives import clip_x0, predictions_from_output

    x0_clip = module.objective.x0_clip
    clip = x0_clip if callable(x0_clip) else (None if x0_clip in (None, "none") else (lambda z: clip_x0(z, x0_clip)))

    def fn(x_t: torch.Tensor, t: torch.Tensor, idx: torch.Tensor):
        c = _rows(cond, idx)
        if null is None or float(scale) == 1.0:
            out = module.net(x_t, t.float(), c)
        else:
            both = module.net(torch.cat([x_t, x_t]), torch.cat([t, t]).float(), concat_cond(c, _rows(null, idx)))
            out_c, out_u = both.chunk(2)
            out = rescale_guidance(cfg_combine(out_c, out_u, scale), out_c, module.guidance.get("rescale") or 0.0)
        x64 = x_t.to(torch.float64)
        ab = module.schedule.alpha_bar(t, like=x64)
        x0, eps = predictions_from_output(out.to(torch.float64), x64, ab, module.objective.prediction)
        if clip is not None:
            x0 = clip(x0)
            eps = (x64 - ab.sqrt() * x0) / (1 - ab).sqrt()
        return x0.to(x_t.dtype), eps.to(x_t.dtype)

    return fn


def ddim_from(model_fn, x_t: torch.Tensor, schedule, ts: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from ``x_t`` along per-sample timesteps ``ts`` (B x K, descending, -1 = not
    started yet) to x_0. ``model_fn(x, t, idx)`` sees only the samples ``idx`` that are running in a round."""
    ab = schedule.alphas_cumprod.to(x_t.device)
    ts = ts.to(x_t.device)
    shape = (-1, *([1] * (x_t.ndim - 1)))
    x = x_t.clone()
    for k in range(ts.shape[1]):
        idx = torch.nonzero(ts[:, k] >= 0).flatten()
        t = ts[idx, k]
        x0, eps = model_fn(x[idx], t, idx)
        ab_prev = ab[ts[idx, k + 1]] if k + 1 < ts.shape[1] else torch.ones_like(ab[t])
        ab_prev = ab_prev.to(x.dtype).reshape(shape)
        x[idx] = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    return x


@torch.no_grad()
def reconstruct(module, x0: torch.Tensor, raw, t_starts: Sequence[int], calls: Sequence[int], noise: torch.Tensor,
                guidance_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise x0 (model space: latents for latent models) to each t in ``t_starts`` and denoise it back with
    ``calls[i]`` DDIM steps, all t batched together.

    Returns (x_t, reconstructions), each ``len(t_starts) * B`` samples ordered t-major; every t uses the same noise.
    """
    r, b = len(t_starts), x0.shape[0]
    x0s = x0.repeat(r, *([1] * (x0.ndim - 1)))
    raw_r = None if raw is None else (raw.repeat(r) if torch.is_tensor(raw) else list(raw) * r)
    cond = module.condition(raw_r)
    null = module.condition(module.null_condition(raw_r)) if raw_r is not None else None
    ts = row_timesteps(t_starts, calls).repeat_interleave(b, dim=0)
    start = torch.tensor([int(t) for t in t_starts]).repeat_interleave(b).to(x0.device)
    x_t = add_noise(x0s, noise.repeat(r, *([1] * (x0.ndim - 1))), module.schedule.alpha_bar(start, like=x0s))
    return x_t, ddim_from(per_sample_model_fn(module, cond, null, guidance_scale), x_t, module.schedule, ts)


def reconstruction_sweep(module, batch: dict, t_fractions: Sequence[float], path: Path, steps: int = 10,
                         guidance_scale: float = 1.0, seed: int = 0, lpips_model=None) -> dict[str, float]:
    """Draw the sweep figure for a real ``batch`` and return per-t MSE (and LPIPS) scalars.

    ``steps`` is the DDIM step count of a full trajectory from T: a start at t uses ``steps x t / T`` calls, all t
    batched together. The same noise is used at every t, so rows differ only in the noise level.
    """
    was_training = module.training
    module.eval()
    device = module.device
    x0 = batch["x"].to(device)
    raw = module.batch_condition(batch)  # labels, prompts (also labels mapped to prompts), or None
    raw = raw.to(device) if torch.is_tensor(raw) else (None if raw is None else list(raw))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    T = module.schedule.num_timesteps
    t_starts = [start_timestep(f, T) for f in t_fractions]
    calls = [max(1, round(steps * t / T)) for t in t_starts]
    x_t, rec = reconstruct(module, x0, raw, t_starts, calls, noise, guidance_scale)
    with torch.no_grad():
        original = module.to_pixels(x0).clamp(-1, 1)
        noised, rec = module.to_pixels(x_t).clamp(-1, 1), module.to_pixels(rec).clamp(-1, 1)
    module.train(was_training)
    n = x0.shape[0]
    scalars, labels = {}, []
    for i, (frac, t) in enumerate(zip(t_fractions, t_starts)):
        labels.append(f"t={t} ({float(frac):.2f}T)")
        rec_i = rec[i * n:(i + 1) * n]
        name = f"t{float(frac):.2f}"
        scalars[f"recon/mse_{name}"] = float(((rec_i - original) ** 2).flatten(1).mean(1).mean())
        if lpips_model is not None:
            from difflab.metrics.lpips_metric import lpips_distance

            scalars[f"recon/lpips_{name}"] = float(lpips_distance(lpips_model, rec_i, original).mean())
    blocks = [column_block(original.repeat(len(t_starts), *([1] * (original.ndim - 1))), ncol=n),
              column_block(noised, ncol=n), column_block(rec, ncol=n)]
    labelled_mosaic(blocks, ["original", "noised x_t", "reconstruction"], labels, path,
                    title=f"reconstruction from x_t (DDIM, {steps} steps per T, guidance {guidance_scale:g})")
    return scalars


class ReconstructionCallback(DiagnosticCallback):
    """Reconstruction sweep of a fixed real validation batch, with EMA weights, on the diagnostics schedule.

    Args:
        t_fractions: start timesteps as fractions of T (one figure row each).
        n_images: real images per row.
        steps: DDIM steps of a full trajectory from T (a start at 0.5T uses half of them; all t run batched).
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
            start_timestep(f, 2)  # validates the range early
        self.t_fractions, self.n_images, self.steps = list(t_fractions), int(n_images), int(steps)
        self.guidance_scale, self.seed = float(guidance_scale), int(seed)
        self.lpips_net, self.lpips_backbone = lpips_net, lpips_backbone
        self._batch: dict | None = None
        self._lpips = None
        self._lpips_tried = False

    def _lpips_model(self):
        if not self._lpips_tried and self.lpips_net:
            from difflab.callbacks.sample_metrics import load_lpips

            self._lpips = load_lpips(self.lpips_net, self.lpips_backbone)
            self._lpips_tried = True
        return self._lpips

    def draw(self, module, path: Path, context: dict[str, Any]) -> dict[str, float]:
        if self._batch is None:
            self._batch = fixed_real_batch(context.get("datamodule"), self.n_images, split="val")
        return reconstruction_sweep(module, self._batch, self.t_fractions, path, self.steps, self.guidance_scale,
                                    self.seed, self._lpips_model())
