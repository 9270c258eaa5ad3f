"""Any folder of images, flat (unconditional) or with one sub-folder per class (class-conditional).

Class mode is detected when the folder holds no images itself but has sub-folders with images (or forced with
``class_folders``); class names are the sorted sub-folder names, and images are found recursively inside each.
Images are decoded with Pillow (EXIF orientation applied), converted to `channels`, resized so the shorter side is
`image_size` and centre-cropped. Hidden files and folders (".*") are skipped. A file that cannot be decoded (truncated,
corrupt, not an image) stops the run with one line naming it (``on_bad_item="error"``, the default), or is skipped,
replaced by the next image, logged and counted in `data_report()` (``on_bad_item="skip"``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from difflab.datamodules.image_common import (
    DictDataset,
    ImageDataModule,
    ImageTransform,
    check_on_bad_item,
    class_prompts,
    holdout_split,
)
from difflab.utils.errors import ConfigError, CorruptDataError, DataNotFoundError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def list_images(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """All image files under `folder` (recursive, sorted, hidden entries skipped)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".") and f.lower().endswith(extensions)]
    return sorted(found)


def _direct_images(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    return [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(extensions)
    ]


def scan_image_folder(
    root: Path, class_folders: bool | None, extensions: tuple[str, ...]
) -> tuple[list[Path], np.ndarray | None, list[str] | None]:
    """Find the images of `root`: (files, int64 labels or None, class names or None)."""
    hint = "set datamodule.data_dir=<folder of images, optionally one sub-folder per class>"
    if not root.is_dir():
        raise DataNotFoundError(f"image folder not found at {root}; {hint}")
    loose = _direct_images(root, extensions)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_folders is None:
        class_folders = not loose and bool(subdirs)
    if not class_folders:
        files = list_images(root, extensions)
        if not files:
            raise DataNotFoundError(f"no images ({', '.join(extensions)}) found under {root}; {hint}")
        return files, None, None
    if loose:
        warnings.warn(
            f"{len(loose)} images directly in {root} are ignored: class mode uses sub-folders only", stacklevel=2
        )
    files, labels, names = [], [], []
    for subdir in subdirs:
        class_files = list_images(subdir, extensions)
        if not class_files:
            raise DataNotFoundError(
                f"class folder {subdir} has no images ({', '.join(extensions)}); remove it or add images"
            )
        labels += [len(names)] * len(class_files)
        names.append(subdir.name)
        files += class_files
    if not files:
        raise DataNotFoundError(f"no class sub-folders with images found under {root}; {hint}")
    return files, np.asarray(labels, dtype=np.int64), names


class ImageFileSource:
    """Decodes image files to uint8 C x H x W tensors with a fixed channel count; optional int labels."""

    def __init__(self, files: list[Path], labels: np.ndarray | None, channels: int) -> None:
        if channels not in _PIL_MODES:
            raise ConfigError(f"datamodule.channels must be 1, 3 or 4, got {channels!r}")
        self.files = [str(f) for f in files]
        self.labels = labels
        self.mode = _PIL_MODES[channels]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int | None]:
        path = self.files[index]
        try:
            with Image.open(path) as im:
                arr = np.asarray(ImageOps.exif_transpose(im).convert(self.mode))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # truncated / unknown / huge
            raise CorruptDataError(
                f"{path}: cannot decode image ({exc}); delete or replace the file, or set "
                f"datamodule.on_bad_item=skip to skip unreadable images"
            ) from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        img = torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C"))  # writable C x H x W copy
        return img, None if self.labels is None else int(self.labels[index])


class ImageFolderDataModule(ImageDataModule):
    """A folder of images as dict batches ``{"x": B x C x S x S in [-1, 1]}`` (+ ``"label"`` in class mode).

    Args:
        data_dir: the folder of images (flat or with one sub-folder per class).
        image_size: output side S (shorter side resized to S, then centre crop).
        channels: 1 (grey), 3 (RGB) or 4 (RGBA).
        flip: random horizontal flips for the training split.
        val_fraction: fraction of the images held out for validation (seeded); 0 for none. The test loader
            uses the same held-out images.
        class_folders: True / False to force class mode on / off, None to detect it.
        extensions: file name endings to accept (default: common image formats).
        on_bad_item: ``error`` (default): an image that cannot be decoded stops the run with one line naming the
            file; ``skip``: it is replaced by the next image of its split, logged once and counted (`data_report`).
    """

    def __init__(
        self,
        data_dir: str | Path,
        image_size: int,
        channels: int = 3,
        flip: bool = True,
        val_fraction: float = 0.05,
        class_folders: bool | None = None,
        extensions: list[str] | tuple[str, ...] | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        on_bad_item: str = "error",
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, drop_last, seed)
        self.on_bad_item = check_on_bad_item(on_bad_item)
        if image_size is None or int(image_size) <= 0:
            raise ConfigError(f"datamodule.image_size must be a positive int, got {image_size!r}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(f"datamodule.val_fraction must be in [0, 1), got {val_fraction!r}")
        self.data_dir = Path(data_dir).expanduser()
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.flip = bool(flip)
        self.val_fraction = float(val_fraction)
        exts = (
            IMAGE_EXTENSIONS if extensions is None else tuple(e if e.startswith(".") else f".{e}" for e in extensions)
        )
        self.extensions = tuple(e.lower() for e in exts)

        files, labels, names = scan_image_folder(self.data_dir, class_folders, self.extensions)
        self.source = ImageFileSource(files, labels, self.channels)
        self.class_names = names
        self.num_classes = None if names is None else len(names)
        self.sample_shape = (self.channels, self.image_size, self.image_size)
        self.prompts = class_prompts(names)
        n = len(files)
        if self.val_fraction > 0 and round(self.val_fraction * n) > 0:
            self._train_idx, self._val_idx = holdout_split(np.arange(n), self.val_fraction, self.seed)
        else:
            self._train_idx, self._val_idx = None, None

    def _build_split(self, name: str) -> Dataset | None:
        if name == "train":
            return DictDataset(
                self.source, ImageTransform(self.image_size, flip=self.flip), self._train_idx, self.on_bad_item
            )
        if name in ("val", "test"):
            if self._val_idx is None:
                return None
            if name == "test":
                return self.split_dataset("val")
            return DictDataset(
                self.source, ImageTransform(self.image_size, flip=False), self._val_idx, self.on_bad_item
            )
        raise ValueError(f"unknown split {name!r}")

    def data_report(self) -> dict[str, dict[str, int]]:
        """Per built split: image count and images found unreadable and skipped so far (``on_bad_item=skip``)."""
        return {
            name: {"images": len(ds), "unreadable_files": ds.num_unreadable}
            for name, ds in self._splits.items()
            if ds is not None
        }
