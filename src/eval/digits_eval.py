"""Judge a digits checkpoint: class accuracy and Frechet distance in the digit classifier's features (FD).

Used by the README's quality claims, the benchmarks and the conditioning-effect check of text models.
"""

from __future__ import annotations

import torch

from difflab.datamodules.digits import DIGIT_NAMES, load_digits_tensors, split_indices
from difflab.eval.digit_classifier import judge, load_digit_classifier
from difflab.metrics.frechet import frechet_distance, gaussian_stats


def real_digit_features(n: int | None = None, split: str = "all", seed: int = 0) -> torch.Tensor:
    """Classifier features of real 16x16 digits (all, or the val split), optionally a random subset of n."""
    x, y = load_digits_tensors(16)
    if split == "val":
        _, va = split_indices(len(x), 0.1, 0)
        x, y = x[va], y[va]
    if n is not None and n < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        x = x[idx]
    return judge(x)["features"]


def fd_to_real(features: torch.Tensor, real: torch.Tensor | None = None) -> float:
    """Frechet distance between sample features and real-digit features."""
    real = real_digit_features() if real is None else real
    return float(frechet_distance(*gaussian_stats(features), *gaussian_stats(real)))


def evaluate_samples(images: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None = None) -> dict:
    """Accuracy against the requested labels and FD to the real digits for a batch of samples."""
    out = judge(images, labels)
    return {"accuracy": out["accuracy"], "fd": fd_to_real(out["features"], real), "n": len(images)}


@torch.no_grad()
def evaluate_module(
    module, n: int = 500, sampler=None, guidance_scale=None, seed: int = 0, batch_size: int = 250
) -> dict:
    """Sample n balanced digits from a trained module (class or text conditioned) and judge them."""
    labels = torch.arange(n) % 10
    raw = labels if module.conditioner.batch_key == "label" else [module.diffusion.prompts[i] for i in labels.tolist()]
    images = _sample(module, raw, sampler, guidance_scale, seed, batch_size)
    return evaluate_samples(images, labels)


@torch.no_grad()
def conditioning_effect(module, n: int = 500, seed: int = 0, batch_size: int = 250) -> dict:
    """Accuracy with the true prompt vs a shuffled prompt (a derangement of the classes).

    If conditioning is used, true-prompt accuracy is high and shuffled-prompt accuracy (judged against the class the
    images were *supposed* to show) is near chance (0.1).
    """
    labels = torch.arange(n) % 10
    prompts = module.diffusion.prompts or [f"a handwritten digit {w}" for w in DIGIT_NAMES]
    shift = torch.randint(1, 10, (1,), generator=torch.Generator().manual_seed(seed)).item()
    true_raw = [prompts[i] for i in labels.tolist()]
    shuffled_raw = [prompts[(i + shift) % 10] for i in labels.tolist()]
    true_imgs = _sample(module, true_raw, None, None, seed, batch_size)
    shuf_imgs = _sample(module, shuffled_raw, None, None, seed, batch_size)
    clf = load_digit_classifier()
    return {
        "true_prompt_accuracy": judge(true_imgs, labels, clf)["accuracy"],
        "shuffled_prompt_accuracy": judge(shuf_imgs, labels, clf)["accuracy"],
        "per_class_true_accuracy": [
            judge(true_imgs[labels == c], labels[labels == c], clf)["accuracy"] for c in range(10)
        ],
    }


def _sample(module, raw, sampler, guidance_scale, seed, batch_size) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = len(raw)
    out = []
    for i in range(0, n, batch_size):
        j = min(n, i + batch_size)
        noise = torch.randn((j - i, *module.diffusion.sample_shape), generator=g)
        out.append(
            module.diffusion.sample(
                module, j - i, raw[i:j], sampler=sampler, guidance_scale=guidance_scale, noise=noise, generator=g
            ).cpu()
        )
    return torch.cat(out)
