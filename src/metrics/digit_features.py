"""The repo's digit classifier as a feature network for Frechet / KID metrics on digits (128-d features)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from difflab.eval.digit_classifier import WEIGHTS, load_digit_classifier


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
