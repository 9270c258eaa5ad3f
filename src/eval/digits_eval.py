"""Judge digits samples: class accuracy and Frechet distance in the digit classifier's features (FD), and the same
in a second, independently trained judge's features, FD on raw pixels and k-NN precision / recall in both.

Used by the README's quality claims, the benchmarks and the conditioning-effect check of text models.
"""

from __future__ import annotations

import torch

from difflab.datamodules.digits import DIGIT_NAMES, load_digits_tensors, split_indices
from difflab.eval.digit_classifier import judge, load_digit_classifier
from difflab.eval.digit_judge2 import load_digit_judge2
from difflab.metrics.frechet import frechet_distance, gaussian_stats
from difflab.metrics.precision_recall import precision_recall

DIGITS_N = 1797  # scikit-learn's digits: the reference set of every FD below
# each score of evaluate_samples -> the feature space it is measured in (recorded in the metric protocol)
DIGIT_JUDGES = {
    "accuracy": "digit classifier (src/eval/digit_classifier.pt)",
    "fd": "digit classifier (src/eval/digit_classifier.pt), 128-d",
    "precision": "digit classifier, k-NN k=3, half the real digits",
    "recall": "digit classifier, k-NN k=3, half the real digits",
    "accuracy_judge2": "second judge (src/eval/digit_judge2.pt)",
    "fd_judge2": "second judge (src/eval/digit_judge2.pt), 84-d",
    "precision_judge2": "second judge, k-NN k=3, half the real digits",
    "recall_judge2": "second judge, k-NN k=3, half the real digits",
    "fd_pixel": "raw pixels (256-d, [-1, 1])",
}
PR_SEED = 0  # which half of the real digits is the precision / recall reference (the other half gives the floor)


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
    """Every judge on a batch of samples in [-1, 1]: accuracy against the requested labels and FD to all real digits
    in the classifier's features (``accuracy``, ``fd``) and the second judge's (``accuracy_judge2``, ``fd_judge2``),
    FD on raw pixels at the samples' resolution (``fd_pixel``), and k-NN precision / recall (k=3) against half the real digits in both judges'
    features (``precision``, ``recall``, ``precision_judge2``, ``recall_judge2``). ``real``: classifier features of
    the real set for ``fd`` (default: all digits)."""
    out = judge(images, labels)
    judge2 = _judge2_outputs(images)
    feats = {"": out["features"], "_judge2": judge2["features"]}
    real_x = _real_pixels()
    reference = precision_recall_halves(len(real_x))[0]
    clf_all = real_digit_features()
    reals = {"": clf_all if real is None else real, "_judge2": _features2(real_x)}
    result = {
        "n": len(images),
        "accuracy": out["accuracy"],
        "fd": fd_to_real(out["features"], reals[""]),
        "accuracy_judge2": (judge2["pred"] == labels.cpu()).float().mean().item(),
        "fd_judge2": _frechet(feats["_judge2"], reals["_judge2"]),
        "fd_pixel": _frechet(_flat(images), _flat(_real_pixels(images.shape[-1]))),  # at the samples' size
    }
    for suffix, generated in feats.items():
        ref = (clf_all if suffix == "" else reals[suffix])[reference]
        result["precision" + suffix], result["recall" + suffix] = precision_recall(ref, generated)
    return result


def real_floor_metrics(n: int, seed: int = 0) -> dict:
    """What ``evaluate_samples`` gives ``n`` real digits (the floor of each metric): FDs of a random subset to all
    digits, precision / recall of ``n`` digits from the half that is not the reference, both accuracies."""
    x, y = load_digits_tensors(16)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    out = evaluate_samples(x[idx], y[idx])
    held_out = precision_recall_halves(len(x))[1][:n]
    for suffix, feats in (("", real_digit_features()), ("_judge2", _features2(x))):
        out["precision" + suffix], out["recall" + suffix] = precision_recall(
            feats[precision_recall_halves(len(x))[0]], feats[held_out]
        )
    return out


def precision_recall_halves(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed split of ``n`` real digits into the k-NN reference half and the held-out half (real floors)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(PR_SEED))
    return order[: n // 2], order[n // 2 :]


def _real_pixels(size: int = 16) -> torch.Tensor:
    return load_digits_tensors(size)[0]


def _flat(images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
    return x.flatten(1).double()


def _frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(frechet_distance(*gaussian_stats(a), *gaussian_stats(b)))


@torch.no_grad()
def _judge2_outputs(images: torch.Tensor) -> dict:
    model = load_digit_judge2()
    feats = torch.cat([model.features(images[i : i + 500]) for i in range(0, len(images), 500)])
    return {"features": feats.double(), "pred": model.head(feats).argmax(1)}


def _features2(images: torch.Tensor) -> torch.Tensor:
    return _judge2_outputs(images)["features"]


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
