"""STL10 (96x96, 10 classes + 100k unlabelled images) from torchvision's on-disk binaries, read lazily.

Layout (as torchvision and the official archive store it): ``<data_dir>/stl10_binary/{train_X,train_y,test_X,
test_y,unlabeled_X}.bin``, ``class_names.txt``, ``fold_indices.txt``. ``*_X.bin`` are raw uint8 images of
3 x 96 x 96, each channel stored column-major; ``*_y.bin`` are uint8 labels 1..10.

Unlike torchvision (which md5-hashes all 2.9 GB and reads whole files into RAM in every process), the files are
size-checked at every start, md5-checked once (remembered in ``stl10_binary/.difflab_verified.json``) and read one
image per index (positioned reads, or ``np.memmap``), so every DataLoader worker and DDP rank shares the OS page
cache, resident memory does not grow with the dataset, and start-up after the first verification is milliseconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from difflab.datamodules.image_common import (
    DictDataset,
    ImageDataModule,
    ImageTransform,
    check_verify_mode,
    class_prompts,
    holdout_split,
    parse_val_split,
    verify_files,
)
from difflab.utils.errors import ConfigError, CorruptDataError, DataNotFoundError

STL10_FOLDER = "stl10_binary"
IMAGE_SHAPE = (3, 96, 96)
IMAGE_BYTES = 3 * 96 * 96
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]

# name -> (size in bytes, md5) of the official files (md5s as published in torchvision's STL10).
STL10_FILES: dict[str, tuple[int, str]] = {
    "train_X.bin": (5000 * IMAGE_BYTES, "918c2871b30a85fa023e0c44e0bee87f"),
    "train_y.bin": (5000, "5a34089d4802c674881badbb80307741"),
    "test_X.bin": (8000 * IMAGE_BYTES, "7f263ba9f9e0b06b93213547f721ac82"),
    "test_y.bin": (8000, "36f9794fa4beb8a2c72628de14fa638e"),
    "unlabeled_X.bin": (100000 * IMAGE_BYTES, "5242ba1fed5e4be9e1e742405eb56ca4"),
}

# split -> parts, each (images file, labels file or None for unlabelled images)
SPLIT_PARTS: dict[str, list[tuple[str, str | None]]] = {
    "train": [("train_X.bin", "train_y.bin")],
    "test": [("test_X.bin", "test_y.bin")],
    "unlabeled": [("unlabeled_X.bin", None)],
    "train+unlabeled": [("train_X.bin", "train_y.bin"), ("unlabeled_X.bin", None)],
}


def read_labels(path: Path, num_images: int, num_classes: int = 10) -> np.ndarray:
    """Read an STL10 ``*_y.bin`` (uint8, 1-based) as int64 0-based labels, checking count and range."""
    raw = np.fromfile(path, dtype=np.uint8)
    if len(raw) != num_images:
        raise CorruptDataError(
            f"{path} has {len(raw)} labels but its images file has {num_images} images; delete both and download again"
        )
    if len(raw) and (raw.min() < 1 or raw.max() > num_classes):
        raise CorruptDataError(
            f"{path} has labels outside 1..{num_classes} (min {raw.min()}, max {raw.max()}); not an STL10 labels file"
        )
    return raw.astype(np.int64) - 1


READERS = ("pread", "memmap")


class STL10Source:
    """STL10 images of one or more ``*_X.bin`` files behind one index, read lazily one image at a time.

    Labels (a few hundred KB) live in RAM; unlabelled images carry `null_label`. Image bytes are never loaded as a
    whole: each index reads its 27 KB through the OS page cache, which every DataLoader worker and DDP rank
    shares. Two readers:

    - "pread" (default): one positioned read per image. Resident memory stays flat whatever the dataset size.
    - "memmap": an `np.memmap` per file. Equally shared, but on recent kernels each page fault maps a whole
      large page-cache folio, so the process's file-backed RSS grows by ~0.75 MB per random image (shared,
      reclaimable page cache; RSS-based memory monitors count it anyway).

    Open files / maps are per process and dropped when pickled, so workers never receive image data.
    """

    def __init__(
        self, folder: Path, parts: list[tuple[str, str | None]], null_label: int, reader: str = "pread"
    ) -> None:
        if reader not in READERS:
            raise ConfigError(f"datamodule.reader must be one of {', '.join(READERS)}, got {reader!r}")
        self.reader = reader if hasattr(os, "pread") else "memmap"
        self.folder = Path(folder)
        self.paths: list[Path] = []
        counts: list[int] = []
        labels: list[np.ndarray] = []
        for x_name, y_name in parts:
            x_path = self.folder / x_name
            size = x_path.stat().st_size
            if size % IMAGE_BYTES:
                raise CorruptDataError(
                    f"{x_path} has {size} bytes, not a multiple of one 3x96x96 image ({IMAGE_BYTES} bytes): "
                    "truncated download? delete it and download again (datamodule.download=true)"
                )
            n = size // IMAGE_BYTES
            self.paths.append(x_path)
            counts.append(n)
            if y_name is None:
                labels.append(np.full(n, null_label, dtype=np.int64))
            else:
                labels.append(read_labels(self.folder / y_name, n))
        self.counts = counts
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        self.null_label = int(null_label)
        self._handles: list[Any] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = None  # re-opened in the receiving process; never pickle image data
        state["_pid"] = -1
        return state

    def __del__(self) -> None:
        self._close()

    def _close(self) -> None:
        handles = getattr(self, "_handles", None)  # absent if __init__ raised
        if handles is not None and self.reader == "pread" and self._pid == os.getpid():
            for fd in handles:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._handles = None

    def _open(self) -> list[Any]:
        if self.reader == "pread":
            self._handles = [os.open(p, os.O_RDONLY | getattr(os, "O_BINARY", 0)) for p in self.paths]
        else:
            self._handles = [
                np.memmap(p, dtype=np.uint8, mode="r", shape=(n, *IMAGE_SHAPE)) if n else None
                for p, n in zip(self.paths, self.counts)
            ]
        self._pid = os.getpid()
        return self._handles

    def read_raw(self, index: int) -> np.ndarray:
        """The stored 3 x 96 x 96 uint8 array of image `index` (channels column-major: C x W x H)."""
        handles = self._handles if self._handles is not None else self._open()
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        if index < 0 or part >= len(handles):
            raise IndexError(f"STL10 index {index} out of range [0, {len(self)})")
        j = index - int(self.starts[part])
        if self.reader == "memmap":
            return handles[part][j]
        buf = os.pread(handles[part], IMAGE_BYTES, j * IMAGE_BYTES)
        if len(buf) != IMAGE_BYTES:
            raise CorruptDataError(f"{self.paths[part]}: short read at image {j} (file truncated while in use?)")
        return np.frombuffer(buf, dtype=np.uint8).reshape(IMAGE_SHAPE)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        raw = self.read_raw(index)
        img = np.ascontiguousarray(raw.transpose(0, 2, 1))  # column-major -> C x H x W, one 27 KB copy
        return torch.from_numpy(img), int(self.labels[index])


class STL10DataModule(ImageDataModule):
    """STL10 as dict batches ``{"x": B x 3 x S x S in [-1, 1], "label": int64 B}``.

    Args:
        data_dir: folder containing ``stl10_binary/`` (torchvision's ``root``); the ``stl10_binary`` folder
            itself is accepted too.
        split: training split: "train" (5k labelled), "unlabeled" (100k), "train+unlabeled" (105k) or "test".
            Unlabelled images get the null label ``num_classes`` (= 10) so they train the unconditional branch.
        val_split: "test" (validate on the 8k test images), a fraction in (0, 1) held out from the labelled
            training images (seeded), or None (no validation).
        image_size: output side; resized on the fly (antialiased) only when it differs from 96.
        flip: random horizontal flips for the training split.
        fold: one of the 10 official 1k-image folds of the labelled training set, or None for all 5k.
        download: fetch the official archive with torchvision's downloader when files are missing.
        verify: "md5" (sizes every start, md5 once, then remembered), "size" (sizes only) or "none" (only the
            structural checks, e.g. for custom subsets in the same format).
        reader: "pread" (one positioned read per image; flat RSS) or "memmap" (np.memmap); both lazy and
            sharing the OS page cache across workers and ranks (see `STL10Source`).
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        val_split: str | float | None = "test",
        image_size: int | None = 96,
        flip: bool = True,
        fold: int | None = None,
        download: bool = False,
        verify: str = "md5",
        reader: str = "pread",
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, drop_last, seed)
        if split not in SPLIT_PARTS:
            raise ConfigError(f"datamodule.split must be one of {', '.join(SPLIT_PARTS)}, got {split!r}")
        if fold is not None and not (isinstance(fold, int) and 0 <= fold < 10):
            raise ConfigError(f"datamodule.fold must be an int in 0..9 or null, got {fold!r}")
        data_dir = Path(data_dir).expanduser()
        if data_dir.name == STL10_FOLDER and not (data_dir / STL10_FOLDER).is_dir():
            data_dir = data_dir.parent
        self.data_dir = data_dir
        self.folder = data_dir / STL10_FOLDER
        self.split = split
        self.val_split = parse_val_split(val_split)
        self.image_size = 96 if image_size is None else int(image_size)
        self.flip = bool(flip)
        self.fold = fold
        self.download = bool(download)
        self.verify = check_verify_mode(verify)
        if reader not in READERS:
            raise ConfigError(f"datamodule.reader must be one of {', '.join(READERS)}, got {reader!r}")
        self.reader = reader

        self.num_classes = len(STL10_CLASSES)
        self.class_names = self._read_class_names()
        self.sample_shape = (3, self.image_size, self.image_size)
        self.prompts = class_prompts(self.class_names)
        self._train_val_indices: tuple[np.ndarray, np.ndarray | None] | None = None
        self._sources: dict[str, STL10Source] = {}

    # files ------------------------------------------------------------------------------------------------------
    def _read_class_names(self) -> list[str]:
        path = self.folder / "class_names.txt"
        try:
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError:
            return list(STL10_CLASSES)
        return names if len(names) == len(STL10_CLASSES) else list(STL10_CLASSES)

    def _needed_files(self, splits: tuple[str, ...]) -> list[str]:
        names: list[str] = []
        for split in splits:
            for x_name, y_name in SPLIT_PARTS[split]:
                names += [n for n in (x_name, y_name) if n is not None and n not in names]
        return names

    def _splits_used(self) -> tuple[str, ...]:
        return (self.split, "test") if self.val_split == "test" else (self.split,)

    def _ensure_files(self, names: list[str]) -> None:
        """Raise DataNotFoundError if a file is missing, then run the configured verification."""
        missing = [n for n in names if not (self.folder / n).is_file()]
        if missing:
            raise DataNotFoundError(
                f"STL10 not found at {self.folder} (expected {', '.join(names)}; missing {', '.join(missing)}); "
                f"set datamodule.download=true or datamodule.data_dir=<dir containing {STL10_FOLDER}>"
            )
        if self.verify != "none":
            verify_files(self.folder, {n: STL10_FILES[n] for n in names}, check_md5=self.verify == "md5")

    def _download(self) -> None:
        """Fetch and extract the official archive (torchvision's URL, md5-checked) into `data_dir`."""
        from torchvision.datasets import STL10 as TorchvisionSTL10
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(
            TorchvisionSTL10.url, str(self.data_dir), filename=TorchvisionSTL10.filename, md5=TorchvisionSTL10.tgz_md5
        )

    def prepare_data(self) -> None:
        """Download if asked and files are missing, then verify (Lightning runs this on one process per node)."""
        names = self._needed_files(self._splits_used())
        if self.download and any(not (self.folder / n).is_file() for n in names):
            self._download()
        self._ensure_files(names)

    # splits -----------------------------------------------------------------------------------------------------
    def _source(self, split: str) -> STL10Source:
        if split not in self._sources:
            self._ensure_files(self._needed_files((split,)))
            self._sources[split] = STL10Source(
                self.folder, SPLIT_PARTS[split], null_label=self.num_classes, reader=self.reader
            )
        return self._sources[split]

    def _fold_indices(self) -> np.ndarray:
        path = self.folder / "fold_indices.txt"
        if not path.is_file():
            raise DataNotFoundError(
                f"STL10 fold file not found at {path}; it ships with the official archive "
                "(datamodule.download=true) or set datamodule.fold=null"
            )
        lines = path.read_text().splitlines()
        try:
            idx = np.array(lines[self.fold].split(), dtype=np.int64)
        except (IndexError, ValueError):
            raise CorruptDataError(f"{path} has no valid line {self.fold} of space-separated indices") from None
        return idx

    def _train_indices(self, source: STL10Source) -> tuple[np.ndarray, np.ndarray | None]:
        """Indices of the training view and of the held-out validation slice (if val_split is a fraction)."""
        if self._train_val_indices is None:
            idx = np.arange(len(source), dtype=np.int64)
            if self.fold is not None and "train" in self.split.split("+"):
                n_train = source.counts[0]
                fold_idx = self._fold_indices()
                if len(fold_idx) and (fold_idx.min() < 0 or fold_idx.max() >= n_train):
                    raise CorruptDataError(f"{self.folder / 'fold_indices.txt'} has indices outside 0..{n_train - 1}")
                idx = np.concatenate([fold_idx, idx[n_train:]])
            val_idx = None
            if isinstance(self.val_split, float):
                labelled = idx[source.labels[idx] != source.null_label]
                candidates = labelled if len(labelled) else idx
                _, val_idx = holdout_split(candidates, self.val_split, self.seed)
                idx = idx[~np.isin(idx, val_idx)]
            self._train_val_indices = (idx, val_idx)
        return self._train_val_indices

    def _build_split(self, name: str) -> Dataset | None:
        plain = ImageTransform(self.image_size, flip=False)
        if name == "train":
            source = self._source(self.split)
            idx, _ = self._train_indices(source)
            full = self.fold is None and len(idx) == len(source)
            return DictDataset(source, ImageTransform(self.image_size, flip=self.flip), None if full else idx)
        if name == "val":
            if self.val_split is None:
                return None
            if self.val_split == "test":
                return self.split_dataset("test")
            source = self._source(self.split)
            _, val_idx = self._train_indices(source)
            return DictDataset(source, plain, val_idx)
        if name == "test":
            return DictDataset(self._source("test"), plain)
        raise ValueError(f"unknown split {name!r}")
