"""Shared pieces of the image datamodules.

- tensor transforms (uint8 -> [-1, 1], resize of the shorter side, centre crop, random horizontal flip),
- `DictDataset`: turns a source of ``(uint8 C x H x W image, label or None)`` into dict samples of the batch
  contract (docs/ARCHITECTURE.md); an unreadable item (a source raising `CorruptDataError`) stops the run with that
  one-line error, or, with ``on_bad_item="skip"``, is replaced by the next readable item and counted,
- `ImageDataModule`: a LightningDataModule base with the standard loader arguments and per-stage split building,
- `verify_files`: size check every time, md5 check once per file version, remembered in a small marker file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from difflab.datamodules.loaders import ResumableDataLoader, make_loader
from difflab.ops.atomic import atomic_write
from difflab.ops.rng import WorkerRNGState
from difflab.utils.errors import ConfigError, CorruptDataError, DiskFullError

log = logging.getLogger(__name__)

MARKER_NAME = ".difflab_verified.json"
_MARKER_FORMAT = 1


# --------------------------------------------------------------------------------------------------------------
# transforms on tensors


def uint8_to_signed(img: Tensor) -> Tensor:
    """Map a uint8 (or 0..255 float) image to float32 in [-1, 1]: the pixel range of the batch contract."""
    return img.to(torch.float32).div_(127.5).sub_(1.0)


def resize_shorter_side(img: Tensor, size: int) -> Tensor:
    """Resize a float C x H x W image so its shorter side is `size` (bilinear, antialiased when shrinking)."""
    h, w = img.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) == (h, w):
        return img
    shrink = new_h < h or new_w < w
    out = F.interpolate(img[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=shrink)
    return out[0]


def center_crop(img: Tensor, size: int) -> Tensor:
    """Crop the central `size` x `size` window of a C x H x W image (H, W >= size)."""
    h, w = img.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"center_crop: image {h}x{w} is smaller than the crop size {size}")
    top, left = (h - size) // 2, (w - size) // 2
    return img[..., top : top + size, left : left + size]


class ImageTransform:
    """uint8 C x H x W tensor -> float32 C x S x S in [-1, 1]; optional random horizontal flip.

    Resizing (shorter side to `image_size`, then centre crop) only happens when the image is not already
    `image_size` x `image_size`, so the common native-resolution path is one cast and one scale. The flip uses
    torch's global RNG, which DataLoader seeds differently in every worker; the datasets checkpoint each worker's
    RNG (`WorkerRNGState`), so a run resumed mid-epoch flips the same images as the uninterrupted run.
    """

    def __init__(self, image_size: int | None = None, flip: bool = False) -> None:
        if image_size is not None and int(image_size) <= 0:
            raise ConfigError(f"image_size must be a positive int or null, got {image_size!r}")
        self.image_size = None if image_size is None else int(image_size)
        self.flip = bool(flip)

    def __call__(self, img: Tensor) -> Tensor:
        s = self.image_size
        if s is not None and tuple(img.shape[-2:]) != (s, s):
            x = center_crop(resize_shorter_side(img.to(torch.float32), s), s)
            x = x.div(127.5).sub_(1.0).clamp_(-1.0, 1.0)
        else:
            x = uint8_to_signed(img)
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x.contiguous()

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, flip={self.flip})"


def class_prompts(class_names: Sequence[str] | None) -> list[str] | None:
    """One text prompt per class ("a photo of a {class}"), underscores read as spaces; None without classes."""
    if class_names is None:
        return None
    return [f"a photo of a {name.replace('_', ' ')}" for name in class_names]


# --------------------------------------------------------------------------------------------------------------
# datasets


class ImageSource(Protocol):
    """Anything indexable that yields ``(uint8 C x H x W tensor, int label or None)``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, int | None]: ...


class ArraySource:
    """In-memory uint8 N x C x H x W images with optional int labels (CIFAR-sized data)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"ArraySource expects uint8 N x C x H x W images, got {images.dtype} {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"ArraySource: {len(images)} images but {len(labels)} labels")
        # torch.from_numpy needs a writable array (unpickled protocol-5 arrays can be read-only views of bytes)
        self.images = images if images.flags.writeable else np.array(images)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int | None]:
        img = torch.from_numpy(self.images[index])
        return img, None if self.labels is None else int(self.labels[index])


BAD_ITEM_CHOICES = ("error", "skip")


def check_on_bad_item(value: str) -> str:
    """Validate ``on_bad_item``: ``error`` (an unreadable item stops the run with one line naming it) or ``skip``
    (it is replaced by the next readable item, logged once and counted)."""
    if value not in BAD_ITEM_CHOICES:
        raise ConfigError(f"datamodule.on_bad_item must be one of {', '.join(BAD_ITEM_CHOICES)}, got {value!r}")
    return value


class DictDataset(WorkerRNGState, Dataset):
    """A view of an `ImageSource` (optionally a subset of its indices) yielding contract samples.

    Each sample is ``{"x": float C x H x W in [-1, 1], "label": int}`` (``label`` omitted when the source has
    none); the default collate turns them into ``x: B x C x H x W`` and ``label: int64 B``.
    An item whose source raises `CorruptDataError` (a truncated image file) re-raises it (``on_bad_item="error"``)
    or, with ``"skip"``, is logged once, flagged in shared memory (`num_unreadable`, seen by every loader worker)
    and replaced by the next readable item of this view: the same replacement on every run, so resume stays exact.
    """

    def __init__(
        self,
        source: ImageSource,
        transform: ImageTransform,
        indices: np.ndarray | None = None,
        on_bad_item: str = "error",
    ) -> None:
        self.source = source
        self.transform = transform
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.on_bad_item = check_on_bad_item(on_bad_item)
        # shared memory: loader workers flag bad items here and the main process sees the flags
        self._bad = torch.zeros(len(self), dtype=torch.bool).share_memory_() if on_bad_item == "skip" else None

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    @property
    def num_unreadable(self) -> int:
        """How many items were found unreadable and skipped so far (in any loader worker)."""
        return 0 if self._bad is None else int(self._bad.sum())

    def _sample(self, index: int) -> dict[str, Any]:
        j = int(index) if self.indices is None else int(self.indices[index])
        img, label = self.source[j]
        sample: dict[str, Any] = {"x": self.transform(img)}
        if label is not None:
            sample["label"] = label
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._bad is None:
            return self._sample(index)
        n = len(self)
        for k in range(n):
            i = (int(index) + k) % n
            if self._bad[i]:
                continue
            try:
                return self._sample(i)
            except CorruptDataError as err:
                self._bad[i] = True
                log.warning("datamodule.on_bad_item=skip: skipping %s", str(err).split("; ")[0])
        raise CorruptDataError(
            f"none of the {n} items of this split could be read (datamodule.on_bad_item=skip); "
            "check datamodule.data_dir"
        )


def holdout_split(candidates: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `candidates` into (kept, held_out) with round(fraction * n) held out, by a seeded permutation.

    The seed makes every DDP rank and every run agree on the split.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation fraction must be in (0, 1), got {fraction!r}")
    candidates = np.asarray(candidates, dtype=np.int64)
    n_val = int(round(fraction * len(candidates)))
    perm = np.random.default_rng(seed).permutation(len(candidates))
    val = np.sort(candidates[perm[:n_val]])
    keep = np.sort(candidates[perm[n_val:]])
    return keep, val


# --------------------------------------------------------------------------------------------------------------
# one-time file verification


def file_md5(path: Path) -> str:
    """md5 hex digest of a file, read in chunks (used for one-time integrity checks)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def _marker_candidates(folder: Path) -> list[Path]:
    """Marker next to the data, then a per-folder file in the user cache (for read-only data folders)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "difflab" / "verified"
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return [folder / MARKER_NAME, cache / f"{key}.json"]


def _read_marker(folder: Path) -> dict[str, dict[str, Any]]:
    for path in _marker_candidates(folder):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == _MARKER_FORMAT and isinstance(data.get("files"), dict):
            return data["files"]
    return {}


def _write_marker(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    payload = json.dumps({"format": _MARKER_FORMAT, "files": files}, indent=1, sort_keys=True)
    for path in _marker_candidates(folder):
        try:
            atomic_write(path, lambda tmp: tmp.write_text(payload))  # concurrent ranks never see half a marker
            return
        except (OSError, DiskFullError):
            continue  # read-only (or full) data folder: try the user cache
    warnings.warn(f"could not write a verification marker for {folder}; md5 checks will repeat next time", stacklevel=2)


def verify_files(folder: Path, expected: Mapping[str, tuple[int | None, str | None]], *, check_md5: bool) -> None:
    """Check the files of a dataset: sizes on every call, md5 once per file version.

    `expected` maps file name -> (size in bytes or None, md5 hex or None). A file whose size and mtime match the
    marker entry recorded after a successful md5 check is not hashed again, so start-up stays fast after the
    first verification. Raises `CorruptDataError` naming the first bad file.
    """
    recorded = _read_marker(folder) if check_md5 else {}
    updated = dict(recorded)
    changed = False
    for name, (size, md5) in expected.items():
        path = folder / name
        st = path.stat()
        if size is not None and st.st_size != size:
            raise CorruptDataError(
                f"{path} has {st.st_size} bytes, expected {size} (truncated or wrong file); "
                "delete it and download again (datamodule.download=true)"
            )
        if not check_md5 or md5 is None:
            continue
        entry = recorded.get(name)
        if (
            isinstance(entry, dict)
            and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
            and entry.get("md5") == md5
        ):
            continue
        digest = file_md5(path)
        if digest != md5:
            raise CorruptDataError(
                f"{path} has md5 {digest}, expected {md5} (corrupt or modified); delete it and download again "
                "(datamodule.download=true), or set datamodule.verify=size to skip the checksum"
            )
        updated[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": digest}
        changed = True
    if changed:
        _write_marker(folder, updated)


VERIFY_MODES = ("md5", "size", "none")


def check_verify_mode(verify: str) -> str:
    """Validate the `verify` option: md5 (sizes always + md5 once), size (sizes only), none (structure only)."""
    if verify not in VERIFY_MODES:
        raise ConfigError(f"datamodule.verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    return verify


# --------------------------------------------------------------------------------------------------------------
# base datamodule


def _accelerator_available() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None:
        return bool(acc.is_available())
    return torch.cuda.is_available()


class ImageDataModule(L.LightningDataModule):
    """Base for the image datamodules: loader settings, per-stage split building, dict-batch loaders.

    Subclasses set the contract attributes (`num_classes`, `class_names`, `sample_shape`, `prompts`) in
    `__init__` and implement `_build_split(name)` for name in ``("train", "val", "test")``, returning a Dataset or
    None when that split does not exist. Splits are built lazily by `setup` and cached.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if int(batch_size) <= 0:
            raise ConfigError(f"datamodule.batch_size must be positive, got {batch_size!r}")
        if int(num_workers) < 0:
            raise ConfigError(f"datamodule.num_workers must be >= 0, got {num_workers!r}")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        self.sample_shape: tuple[int, ...] | None = None
        self.prompts: list[str] | None = None
        self._splits: dict[str, Dataset | None] = {}

    # subclasses -------------------------------------------------------------------------------------------------
    def _build_split(self, name: str) -> Dataset | None:
        raise NotImplementedError

    # lightning hooks --------------------------------------------------------------------------------------------
    _STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}

    def setup(self, stage: str | None = None) -> None:
        """Build (once) the splits this stage needs; all of them when `stage` is None."""
        names = self._STAGE_SPLITS.get(stage, ("train", "val", "test")) if stage else ("train", "val", "test")
        for name in names:
            self.split_dataset(name)

    def split_dataset(self, name: str) -> Dataset | None:
        """The dataset of split `name` ("train" | "val" | "test"), built on first use."""
        if name not in self._splits:
            self._splits[name] = self._build_split(name)
        return self._splits[name]

    @property
    def train_set(self) -> Dataset | None:
        return self._splits.get("train")

    @property
    def val_set(self) -> Dataset | None:
        return self._splits.get("val")

    @property
    def test_set(self) -> Dataset | None:
        return self._splits.get("test")

    def _loader(self, dataset: Dataset | None, train: bool) -> ResumableDataLoader | list:
        if dataset is None:
            return []  # Lightning treats an empty list as "no batches for this stage"
        workers = self.num_workers
        return make_loader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=workers,
            pin_memory=self.pin_memory and _accelerator_available(),
            persistent_workers=self.persistent_workers and workers > 0,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        dataset = self.split_dataset("train")
        if dataset is None:
            raise ConfigError(f"{type(self).__name__} has no training split")
        return self._loader(dataset, train=True)

    def val_dataloader(self) -> ResumableDataLoader | list:
        return self._loader(self.split_dataset("val"), train=False)

    def test_dataloader(self) -> ResumableDataLoader | list:
        return self._loader(self.split_dataset("test"), train=False)


def parse_val_split(val_split: Any) -> str | float | None:
    """Validate `val_split`: "test" (use the test split), a fraction in (0, 1) held out from train, or None."""
    if val_split is None or val_split == "test":
        return val_split
    if isinstance(val_split, str):
        try:
            val_split = float(val_split)
        except ValueError:
            raise ConfigError(
                f"datamodule.val_split must be 'test', a fraction in (0, 1) or null, got {val_split!r}"
            ) from None
    if isinstance(val_split, (int, float)) and not isinstance(val_split, bool) and 0.0 < float(val_split) < 1.0:
        return float(val_split)
    if isinstance(val_split, (int, float)) and not isinstance(val_split, bool) and float(val_split) == 0.0:
        return None
    raise ConfigError(f"datamodule.val_split must be 'test', a fraction in (0, 1) or null, got {val_split!r}")
