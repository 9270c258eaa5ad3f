"""Feature networks for Frechet metrics on digits: the repo's digit classifier (128-d), the second judge (84-d) and
raw pixels."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from difflab.eval.digit_classifier import WEIGHTS, load_digit_classifier
from difflab.eval.digit_judge2 import WEIGHTS as JUDGE2_WEIGHTS
from difflab.eval.digit_judge2 import load_digit_judge2


class DigitFeatures(nn.Module):
    """The digit classifier's 128-d penultimate features for images in [-1, 1] (RGB is averaged to grey)."""

    num_features = 128

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        path = Path(weights) if weights else WEIGHTS
        self.classifier = load_digit_classifier(path)
        self.weights_path = path
        self.resize = "RGB averaged to grey; bilinear resize to 16x16 (align_corners=False) unless already 16x16"

    @staticmethod
    def _grey(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"digit classifier features need B x 1|3 x H x W images, got {tuple(x.shape)}")
        return x.float().mean(dim=1, keepdim=True) if x.shape[1] == 3 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(self._grey(x))

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted digit from features returned by ``forward``."""
        return self.classifier.head(features).argmax(dim=1)


class DigitJudge2Features(nn.Module):
    """The second, independently trained digits judge's 84-d features (``src/eval/digit_judge2.py``): a claim that
    holds in both judges' features is not one network's blind spot."""

    num_features = 84

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        path = Path(weights) if weights else JUDGE2_WEIGHTS
        self.judge = load_digit_judge2(path)
        self.weights_path = path
        self.resize = "RGB averaged to grey; bilinear resize to 16x16 (align_corners=False) unless already 16x16"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge.features(DigitFeatures._grey(x))

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted digit from features returned by ``forward``."""
        return self.judge.head(features).argmax(dim=1)


class PixelFeatures(nn.Module):
    """Raw pixels in [-1, 1] as features (C x H x W values per sample): FD with no learned network in the way."""

    weights_path = None
    resize = "none (raw pixels at the samples' resolution, [-1, 1])"

    def __init__(self, sample_shape):
        super().__init__()
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.num_features = int(torch.tensor(self.sample_shape).prod())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().clamp(-1, 1).flatten(1)
