"""Zero-shot judges that say which class (or prompt) a generated image shows, for scored sample grids.

The STL10 research log added "CLIP-based image scoring in fixed-seed grid titles" after a run whose samples ignored
the requested class for thousands of steps while the loss looked fine. A judge labels every grid cell with its
predicted class and a score, and the grid's agreement rate (the fraction of conditional cells whose prediction is
the requested class) becomes a logged metric, so a conditioning regression shows in the first grid.

- ``DigitJudge``: the repo's digit classifier (``src/eval/digit_classifier.pt``); score = softmax probability.
- ``ClipJudge``: CLIP from a local directory (``callbacks.class_grid.clip_model``); candidates are the class names
  (as "a photo of a {name}") or the grid's prompts; score = CLIP score (100 x cosine) of the predicted candidate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from difflab.eval.digit_classifier import WEIGHTS, load_digit_classifier
from difflab.metrics.clip_score import load_clip_scorer

JUDGES = ("auto", "digit_classifier", "clip", "none")


@dataclass
class Verdict:
    """A judge's answer for a batch: predicted candidate index and its score per image."""

    predicted: Tensor  # B, long: index into the candidates
    score: Tensor  # B, float
    score_name: str  # what the score is ("p" = probability, "clip" = 100 x cosine)


class DigitJudge:
    """The digit classifier as a judge of 16x16 digit samples; candidates must be the ten digits in order."""

    name = "digit classifier"
    score_name = "p"

    def __init__(self, weights: str | os.PathLike | None = None):
        self.classifier = load_digit_classifier(Path(weights) if weights else WEIGHTS).eval()

    @torch.no_grad()
    def judge(self, images: Tensor, candidates: list[str], as_prompts: bool = False) -> Verdict:
        """Predicted digit and its probability for images in [-1, 1] (``B x 1|3 x H x W``)."""
        if len(candidates) != 10:
            raise ValueError(f"the digit judge scores the ten digit classes; got {len(candidates)} candidates")
        x = images.float().mean(dim=1, keepdim=True) if images.shape[1] == 3 else images.float()
        clf = self.classifier.to(x.device)
        probs = clf.head(clf.features(x)).softmax(dim=1)
        score, predicted = probs.max(dim=1)
        return Verdict(predicted.cpu(), score.cpu(), self.score_name)


class ClipJudge:
    """CLIP zero-shot classification over the candidates (class names or prompts)."""

    name = "CLIP"
    score_name = "clip"

    def __init__(self, scorer, template: str = "a photo of a {}"):
        self.scorer, self.template = scorer, template

    @torch.no_grad()
    def judge(self, images: Tensor, candidates: list[str], as_prompts: bool = False) -> Verdict:
        """The candidate with the highest CLIP similarity per image, and that similarity (100 x cosine)."""
        texts = list(candidates) if as_prompts else [self.template.format(c) for c in candidates]
        sims = self.scorer.similarity_matrix(images, texts)  # B x K
        score, predicted = sims.max(dim=1)
        return Verdict(predicted.cpu(), score.cpu(), self.score_name)


def build_judge(kind: str, module, clip_model: str | None = None, digit_weights: str | None = None):
    """The judge for a module's grid: ``auto`` picks the digit classifier for 1-channel, 10-class label models and
    CLIP when ``clip_model`` is given; None when no judge applies (or CLIP cannot be loaded: one warning)."""
    if kind not in JUDGES:
        raise ValueError(f"class_grid.judge={kind!r}: choose one of {JUDGES}")
    if kind == "none":
        return None
    conditioner = getattr(module, "conditioner", None)
    key = getattr(conditioner, "batch_key", None)
    shape = tuple(module.diffusion.sample_shape)
    digits = key == "label" and getattr(conditioner, "num_classes", None) == 10 and len(shape) == 3 and shape[0] == 1
    if kind == "digit_classifier" or (kind == "auto" and digits and not clip_model):
        if not digits:
            raise ValueError(
                "class_grid.judge=digit_classifier needs a 1-channel image model with 10 classes; "
                "use judge=clip with a clip_model, or none"
            )
        return DigitJudge(digit_weights)
    if key not in ("label", "text") or not clip_model:
        return None
    scorer = load_clip_scorer(clip_model)
    return None if scorer is None else ClipJudge(scorer)


def agreement_rate(predicted: Tensor, wanted: Tensor) -> float:
    """Fraction of cells whose predicted candidate is the requested one."""
    if predicted.numel() == 0:
        return float("nan")
    return float((predicted.cpu() == wanted.cpu()).double().mean())
