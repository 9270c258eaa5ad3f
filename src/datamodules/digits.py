"""The embedded default dataset: scikit-learn's 8x8 handwritten digits (1797 real images), upsampled."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from difflab.datamodules.loaders import ResumableDataLoader, make_loader
from difflab.ops.rng import WorkerRNGState

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_digits_tensors(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as float images in [-1, 1] (N x 1 x S x S, bilinear upsampling) and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous(), torch.from_numpy(d.target.astype(np.int64))


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random train/val split of range(n)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


class TensorDictDataset(WorkerRNGState, Dataset):
    """In-memory dataset yielding dict samples {x, label}."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        item = {"x": self.x[i]}
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item


class DigitsDataModule(L.LightningDataModule):
    """Digits at ``image_size`` (default 16x16), 1 channel, class labels 0-9, optional horizontal flip (off)."""

    def __init__(
        self,
        image_size: int = 16,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.image_size, self.val_fraction, self.seed = image_size, val_fraction, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers and num_workers > 0
        self.num_classes = 10
        self.class_names = list(DIGIT_NAMES)
        self.sample_shape = (1, image_size, image_size)
        self.prompts = [f"a handwritten digit {name}" for name in DIGIT_NAMES]
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors(self.image_size)
        tr, va = split_indices(len(x), self.val_fraction, self.seed)
        self.train_set = TensorDictDataset(x[tr], y[tr])
        self.val_set = TensorDictDataset(x[va], y[va])

    def _loader(self, ds, shuffle: bool, drop_last: bool) -> ResumableDataLoader:
        return make_loader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.train_set, shuffle=True, drop_last=True)

    def val_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.val_set, shuffle=False, drop_last=False)
