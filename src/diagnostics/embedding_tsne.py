"""The conditioning embeddings in 2-D (t-SNE) with their mean cosine similarity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difflab.diagnostics.figures import font
from difflab.metrics.common import warn_once
from difflab.ops.atomic import atomic_write
from difflab.utils.conditions import condition_key


@torch.no_grad()
def condition_embeddings(module, max_prompts: int = 200) -> tuple[np.ndarray, list[str], str] | None:
    """(N x D vectors, N labels, description) of the module's condition embeddings; None when there are none."""
    key = condition_key(module)
    cond = module.conditioner
    if key == "label" and hasattr(cond, "embedding"):
        w = cond.embedding.weight.detach().float().cpu().numpy()
        k = cond.num_classes
        names = list(module.diffusion.class_names or [str(i) for i in range(k)])[:k]
        return w, names + ["(null)"] * (w.shape[0] - k), "class embeddings (conditioner.embedding.weight)"
    if key == "text":
        prompts = list(dict.fromkeys(module.diffusion.prompts or []))[:max_prompts]
        if not prompts:
            return None
        prompts = prompts + [""]
        out = cond(prompts)
        if out.get("vector") is not None:
            vec, what = out["vector"], "projected pooled text embeddings (the denoiser's condition vector)"
        else:
            vec, what = cond.embed(prompts)[2], "pooled text embeddings"
        return vec.detach().float().cpu().numpy(), [p if p else "(empty prompt)" for p in prompts], what
    return None


def tsne_2d(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of N vectors (perplexity scaled to N); PCA for N < 5 where t-SNE is undefined."""
    n = vectors.shape[0]
    x = vectors - vectors.mean(axis=0, keepdims=True)
    if n < 5:
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        out = u[:, :2] * s[:2]
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    return TSNE(
        n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed, max_iter=250
    ).fit_transform(x.astype(np.float64))


def mean_cosine(vectors: np.ndarray) -> float:
    """Mean off-diagonal cosine similarity of N vectors (1 = all identical directions)."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
    sim = v @ v.T
    n = len(v)
    return float((sim.sum() - np.trace(sim)) / max(1, n * (n - 1)))


PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


NULL_NAMES = ("(null)", "(empty prompt)")


def scatter_plot(xy: np.ndarray, labels: list[str], path: Path, title: str, size: int = 640) -> Path:
    """A labelled 2-D scatter (PIL, no axes: t-SNE coordinates carry no units); null conditions drawn as black x."""
    from PIL import Image, ImageDraw

    margin, top = 40, 40
    canvas = Image.new("RGB", (size + 2 * margin + 160, size + top + margin), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((canvas.width / 2, 10), title, fill="black", font=font(14), anchor="ma")
    draw.rectangle([margin - 10, top - 10, margin + size + 10, top + size + 10], outline="#bbbbbb")
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    pts = (xy - lo) / span * size + np.array([margin, top])
    label_font = font(12)
    for i, ((x, y), name) in enumerate(zip(pts, labels)):
        if name in NULL_NAMES:
            draw.line([x - 6, y - 6, x + 6, y + 6], fill="black", width=2)
            draw.line([x - 6, y + 6, x + 6, y - 6], fill="black", width=2)
        else:
            draw.ellipse([x - 6, y - 6, x + 6, y + 6], fill=PALETTE[i % len(PALETTE)])
        draw.text((x + 9, y - 9), name if len(name) <= 28 else name[:26] + "..", fill="black", font=label_font)
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def embedding_tsne(module, path: Path, seed: int = 0, max_prompts: int = 200) -> dict[str, float] | None:
    """Draw the labelled t-SNE scatter of the module's condition embeddings; None (one warning) if unconditional."""
    found = condition_embeddings(module, max_prompts)
    if found is None:
        warn_once("tsne-none", "embedding t-SNE skipped: the model has no class or prompt embeddings to show")
        return None
    vectors, labels, what = found
    xy = tsne_2d(vectors, seed)
    scatter_plot(xy, labels, path, f"t-SNE of {what}, n={len(labels)}")
    real = [i for i, n in enumerate(labels) if n not in NULL_NAMES]
    return {"embeddings/mean_cosine": mean_cosine(vectors[real])} if len(real) >= 2 else {}
