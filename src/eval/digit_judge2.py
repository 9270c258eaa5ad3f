"""A second, independent digits judge: a LeNet-style network (max pooling, fully connected 84-d features), another
architecture, seed, split and augmentation than the repo's digit classifier (``digit_classifier.py``).

Why: a quality claim that holds only in one network's features may be that network's blind spot. This judge is
kept out of every training and tuning decision in difflab (no callback, checkpoint monitor, sweep or default reads
it); benchmarks report it beside the first judge. ``digit_judge2.pt`` is produced by
``python -m difflab.eval.digit_judge2`` (held-out validation split of 20% drawn with seed 7, random shifts of up to
2 pixels and contrast jitter, seed 7) and loads with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = Path(__file__).with_name("digit_judge2.pt")
SEED = 7
VAL_FRACTION = 0.2


class DigitJudge2(nn.Module):
    """conv5-pool-conv3-pool -> fc 120 -> fc 84 (features) -> 10 logits. Input: N x 1 x 16 x 16 in [-1, 1]."""

    feature_dim = 84

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 8, 5, padding=2),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(16 * 4 * 4, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh())
        self.head = nn.Linear(84, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 84-d features of 16x16 digits (uint8 or [-1, 1] floats; other sizes are resized bilinearly)."""
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1
        if x.shape[-1] != 16:
            x = F.interpolate(x.float(), size=(16, 16), mode="bilinear", align_corners=False)
        return self.fc(self.conv(x.float()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_digit_judge2(path: str | Path = WEIGHTS, device: str | torch.device = "cpu") -> DigitJudge2:
    """The trained second judge in eval mode."""
    model = DigitJudge2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().to(device)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (per batch) and a per-image contrast jitter."""
    dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    gain = 1 + 0.2 * (torch.rand(x.shape[0], 1, 1, 1, generator=g) - 0.5)
    return ((x + 1) * gain - 1).clamp(-1, 1)


def train_judge2(epochs: int = 60, seed: int = SEED) -> tuple[DigitJudge2, float]:
    """Train on 80% of the digits (its own split, drawn with ``seed``); returns the model and held-out accuracy."""
    from difflab.datamodules.digits import load_digits_tensors

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = load_digits_tensors(16)
    order = torch.randperm(len(x), generator=g)
    n_val = int(VAL_FRACTION * len(x))
    va, tr = order[:n_val], order[n_val:]
    model = DigitJudge2()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        perm = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(perm), 32):
            idx = perm[i : i + 32]
            loss = F.cross_entropy(model(_augment(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[va]).argmax(1) == y[va]).float().mean().item()
    return model, acc


if __name__ == "__main__":
    torch.set_num_threads(1)
    judge2, accuracy = train_judge2()
    torch.save(judge2.state_dict(), WEIGHTS)
    print(f"saved {WEIGHTS} (held-out accuracy {accuracy:.4f})")
