"""CIFAR-10 / CIFAR-100 from the official "python version" pickles (torchvision's on-disk layout).

Layouts: ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``<data_dir>/cifar-100-python/{train, test, meta}``. Each data pickle is a dict with ``data`` (uint8 N x 3072:
the R, G, B planes of a 32 x 32 image, row-major) and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100); the
meta pickles hold ``label_names`` / ``fine_label_names``. The official files are Python 2 pickles, so their keys
come back as ``str`` with ``encoding="latin1"`` and as ``bytes`` (``b'data'``) with ``encoding="bytes"``: both are
accepted. Pickles are read with an unpickler that only admits numpy array reconstruction, so a tampered file
cannot run code.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from difflab.datamodules.image_common import (
    ArraySource,
    DictDataset,
    ImageDataModule,
    ImageTransform,
    check_verify_mode,
    class_prompts,
    holdout_split,
    parse_val_split,
    verify_files,
)
from difflab.utils.errors import CorruptDataError, DataNotFoundError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes inside protocol-2 pickles written by Python 3
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays need; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR pickle")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy.core is a deprecated alias of numpy._core in numpy 2
            return super().find_class(module, name)


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


def load_cifar_pickle(path: Path) -> dict[str, Any]:
    """Load one CIFAR pickle safely; keys (and string values) as ``str`` whether stored as py2 str or bytes."""
    try:
        with open(path, "rb") as f:
            entry = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except OSError as exc:
        raise CorruptDataError(f"{path}: cannot read ({exc})") from None
    except Exception as exc:  # truncated / garbage / disallowed content
        raise CorruptDataError(
            f"{path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc}); "
            "delete it and download again (datamodule.download=true)"
        ) from None
    if not isinstance(entry, dict):
        raise CorruptDataError(f"{path} holds a {type(entry).__name__}, expected a dict of CIFAR arrays")
    return {_text(k): v for k, v in entry.items()}


def read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one data pickle as (uint8 N x 3 x 32 x 32 images, int64 labels), checking shapes and label range."""
    entry = load_cifar_pickle(path)
    if "data" not in entry or label_key not in entry:
        raise CorruptDataError(f"{path} lacks key 'data' or '{label_key}' (has {sorted(entry)}); not a CIFAR file")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CorruptDataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 N x 3072")
    if labels.shape != (data.shape[0],):
        raise CorruptDataError(f"{path}: {data.shape[0]} images but {labels.size} entries in '{label_key}'")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptDataError(f"{path}: '{label_key}' has values outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


class CIFARDataModule(ImageDataModule):
    """Common CIFAR logic; `CIFAR10DataModule` / `CIFAR100DataModule` only fill in the file layout.

    Args:
        data_dir: folder containing the ``cifar-10-batches-py`` / ``cifar-100-python`` folder (torchvision's
            ``root``); the dataset folder itself is accepted too.
        val_split: "test" (validate on the test set), a fraction in (0, 1) held out from train (seeded), or None.
        image_size: output side; 32 is native, anything else is resized on the fly (e.g. 64).
        flip: random horizontal flips for the training split.
        download: fetch the official archive with torchvision's downloader when files are missing.
        verify: "md5" (md5 once per file version, remembered in a marker file) or "none".
    """

    folder_name: str = ""
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    meta_file: str = ""
    label_key: str = ""
    names_key: str = ""
    default_classes: list[str] = []
    md5s: dict[str, str] = {}
    torchvision_class: str = ""
    display_name: str = ""

    def __init__(
        self,
        data_dir: str | Path,
        val_split: str | float | None = "test",
        image_size: int | None = 32,
        flip: bool = True,
        download: bool = False,
        verify: str = "md5",
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, drop_last, seed)
        data_dir = Path(data_dir).expanduser()
        if data_dir.name == self.folder_name and not (data_dir / self.folder_name).is_dir():
            data_dir = data_dir.parent
        self.data_dir = data_dir
        self.folder = data_dir / self.folder_name
        self.val_split = parse_val_split(val_split)
        self.image_size = 32 if image_size is None else int(image_size)
        self.flip = bool(flip)
        self.download = bool(download)
        self.verify = check_verify_mode(verify)
        if self.verify == "size":
            self.verify = "none"  # no published sizes for CIFAR; pickle parsing checks the structure

        self.class_names = self._read_class_names()
        self.num_classes = len(self.class_names)
        self.sample_shape = (3, self.image_size, self.image_size)
        self.prompts = class_prompts(self.class_names)
        self._arrays: dict[str, ArraySource] = {}
        self._holdout: tuple[np.ndarray, np.ndarray] | None = None

    # files ------------------------------------------------------------------------------------------------------
    def _read_class_names(self) -> list[str]:
        path = self.folder / self.meta_file
        if not path.is_file():
            return list(self.default_classes)
        names = load_cifar_pickle(path).get(self.names_key)
        if not isinstance(names, (list, tuple)) or not names:
            raise CorruptDataError(f"{path} lacks a '{self.names_key}' list; not a {self.display_name} meta file")
        return [str(_text(n)) for n in names]

    def _ensure_files(self, names: tuple[str, ...]) -> None:
        missing = [n for n in names if not (self.folder / n).is_file()]
        if missing:
            raise DataNotFoundError(
                f"{self.display_name} not found at {self.folder} (expected {', '.join(names)}; missing "
                f"{', '.join(missing)}); set datamodule.download=true or "
                f"datamodule.data_dir=<dir containing {self.folder_name}>"
            )
        if self.verify == "md5":
            verify_files(self.folder, {n: (None, self.md5s.get(n)) for n in names}, check_md5=True)

    def _all_files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)

    def _download(self) -> None:
        """Fetch and extract the official archive (torchvision's URL, md5-checked) into `data_dir`."""
        import torchvision.datasets as tvd
        from torchvision.datasets.utils import download_and_extract_archive

        cls = getattr(tvd, self.torchvision_class)
        download_and_extract_archive(cls.url, str(self.data_dir), filename=cls.filename, md5=cls.tgz_md5)

    def prepare_data(self) -> None:
        """Download if asked and files are missing, then verify (Lightning runs this on one process per node)."""
        names = self._all_files()
        if self.download and any(not (self.folder / n).is_file() for n in names):
            self._download()
        self._ensure_files(names)

    # splits -----------------------------------------------------------------------------------------------------
    def _source(self, split: str) -> ArraySource:
        if split not in self._arrays:
            files = self.train_files if split == "train" else self.test_files
            self._ensure_files(files)
            parts = [read_cifar_batch(self.folder / f, self.label_key, self.num_classes) for f in files]
            images = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            self._arrays[split] = ArraySource(images, labels)
        return self._arrays[split]

    def _split_train(self, source: ArraySource) -> tuple[np.ndarray, np.ndarray]:
        if self._holdout is None:
            self._holdout = holdout_split(np.arange(len(source)), float(self.val_split), self.seed)  # type: ignore[arg-type]
        return self._holdout

    def _build_split(self, name: str) -> Dataset | None:
        plain = ImageTransform(self.image_size, flip=False)
        if name == "train":
            source = self._source("train")
            idx = self._split_train(source)[0] if isinstance(self.val_split, float) else None
            return DictDataset(source, ImageTransform(self.image_size, flip=self.flip), idx)
        if name == "val":
            if self.val_split is None:
                return None
            if self.val_split == "test":
                return self.split_dataset("test")
            source = self._source("train")
            return DictDataset(source, plain, self._split_train(source)[1])
        if name == "test":
            return DictDataset(self._source("test"), plain)
        raise ValueError(f"unknown split {name!r}")


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: 50k train / 10k test 32x32 images, 10 classes (names from ``batches.meta``)."""

    folder_name = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    label_key = "labels"
    names_key = "label_names"
    default_classes = CIFAR10_CLASSES
    md5s = {  # as published in torchvision's CIFAR10
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    }
    torchvision_class = "CIFAR10"
    display_name = "CIFAR-10"


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100: 50k train / 10k test 32x32 images, 100 fine classes (names from ``meta``)."""

    folder_name = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    label_key = "fine_labels"
    names_key = "fine_label_names"
    default_classes = CIFAR100_CLASSES
    md5s = {  # as published in torchvision's CIFAR100
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    }
    torchvision_class = "CIFAR100"
    display_name = "CIFAR-100"
