"""Validation loss per log-SNR bucket, measured without a trainer, and its curve over training."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from difflab.diagnostics.figures import new_figure, save_figure
from difflab.diffusion.objectives import bucket_edges


@torch.no_grad()
def bucket_losses(module, loader, max_batches: int | None = None) -> list[float]:
    """Per-bucket validation loss of ``module`` on ``loader`` without a trainer: ``module.validation_losses`` (the
    same fixed noise and times as validation), so it matches the logged ``val_loss_t/bucket_XX``."""
    was_training = module.training
    module.eval()
    sums = torch.zeros(2, module.loss_buckets, dtype=torch.float64)
    for batch_idx, batch in enumerate(loader):
        if max_batches is not None and batch_idx >= max_batches:
            break
        batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out = module.diffusion.validation_losses(module, batch, batch_idx, module.loss_buckets)
        b = out["bucket"].cpu()
        sums[0].index_add_(0, b, out["raw"].double().cpu())
        sums[1].index_add_(0, b, torch.ones(len(b), dtype=torch.float64))
    module.train(was_training)
    return (sums[0] / sums[1].clamp(min=1)).tolist()


def timestep_loss_figure(
    history: Sequence[tuple[int, Sequence[float]]],
    path: Path,
    title: str = "validation loss per noise-level (log-SNR) bucket",
) -> Path:
    """Plot a history of ``(step, per-bucket losses)`` as the two-panel figure described above."""
    import matplotlib

    if not history:
        raise ValueError("timestep_loss_figure: empty history (no validation has run yet)")
    fig = new_figure(1100, 420)
    ax_t, ax_s = fig.subplots(1, 2)
    cmap = matplotlib.colormaps["viridis"]
    n_b = len(history[-1][1])
    edges = bucket_edges(n_b)
    centres = [(hi + lo) / 2 for hi, lo in edges]
    history = [(s, [v if v > 0 else float("nan") for v in losses]) for s, losses in history]  # 0 = empty bucket
    for j, (step, losses) in enumerate(history):
        shade = cmap(0.15 + 0.85 * j / max(1, len(history) - 1))
        ax_t.plot(centres[: len(losses)], losses, "-o", ms=3, color=shade, label=f"step {step}")
    ax_t.set_xlabel("log-SNR (bucket centre; ends collect everything beyond)")
    ax_t.invert_xaxis()  # noise increases to the right
    ax_t.set_ylabel("validation loss (unweighted)")
    ax_t.set_yscale("log")
    ax_t.set_title("loss vs noise level (darker = earlier)" if len(history) > 1 else f"step {history[-1][0]}")
    if len(history) <= 8:
        ax_t.legend(fontsize=7)
    steps = [s for s, _ in history]
    bucket_cmap = matplotlib.colormaps["coolwarm"]
    for b in range(n_b):
        ys = [losses[b] if b < len(losses) else float("nan") for _, losses in history]
        ax_s.plot(
            steps,
            ys,
            "-o",
            ms=3,
            color=bucket_cmap(b / max(1, n_b - 1)),
            label=f"log-SNR {edges[b][0]:+.0f}..{edges[b][1]:+.0f}",
        )
    ax_s.set_xlabel("training step")
    ax_s.set_yscale("log")
    ax_s.set_title("loss per bucket over training")
    ax_s.legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
