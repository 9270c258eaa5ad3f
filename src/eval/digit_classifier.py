"""A small CNN that recognises 16x16 digits; kept in the repo to judge generated samples (accuracy and FD).

The weights file ``digit_classifier.pt`` next to this module is produced by ``python -m difflab.eval.digit_classifier``
(trained on the scikit-learn digits train split, with small random shifts) and loads with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = Path(__file__).with_name("digit_classifier.pt")


class DigitClassifier(nn.Module):
    """Three conv layers -> 128-d features -> 10 logits. Input: N x 1 x 16 x 16 in [-1, 1]."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(128, 10)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1
        if x.shape[-1] != 16:
            x = F.interpolate(x.float(), size=(16, 16), mode="bilinear", align_corners=False)
        return x.float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate 128-d features (for Frechet distance in classifier space)."""
        return self.body(self._prep(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_digit_classifier(path: str | Path = WEIGHTS, device="cpu") -> DigitClassifier:
    """The trained classifier in eval mode."""
    model = DigitClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().to(device)


@torch.no_grad()
def judge(
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    model: DigitClassifier | None = None,
    batch_size: int = 500,
) -> dict:
    """Predicted labels, features and (if labels are given) accuracy for images (uint8 or [-1, 1] floats)."""
    model = model or load_digit_classifier()
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(images[i : i + batch_size])
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    out = {"pred": torch.cat(preds), "features": torch.cat(feats).double()}
    if labels is not None:
        out["accuracy"] = (out["pred"] == labels.cpu()).float().mean().item()
    return out


def _random_shift(x: torch.Tensor, max_shift: int = 1) -> torch.Tensor:
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(epochs: int = 40, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train on the digits train split (the same split the diffusion datamodule uses); returns model, val accuracy."""
    from difflab.datamodules.digits import load_digits_tensors, split_indices

    torch.manual_seed(seed)
    x, y = load_digits_tensors(16)
    tr, va = split_indices(len(x), 0.1, 0)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(epochs):
        perm = torch.from_numpy(tr)[torch.randperm(len(tr))]
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(_random_shift(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[va]).argmax(1) == y[va]).float().mean().item()
    return model, acc


if __name__ == "__main__":
    torch.set_num_threads(1)
    clf, acc = train_classifier()
    torch.save(clf.state_dict(), WEIGHTS)
    print(f"saved {WEIGHTS} (validation accuracy {acc:.4f})")
