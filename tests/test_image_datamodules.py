"""Image datamodules (STL10, CIFAR-10/100, image folder) on tiny datasets written in the exact on-disk formats."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from difflab.datamodules import image_common, stl10
from difflab.datamodules.cifar import CIFAR100_CLASSES, CIFAR10DataModule, CIFAR100DataModule, load_cifar_pickle
from difflab.datamodules.image_common import ImageTransform, class_prompts, resize_shorter_side
from difflab.datamodules.image_folder import ImageFolderDataModule
from difflab.datamodules.stl10 import STL10DataModule
from difflab.utils.errors import CorruptDataError, DataNotFoundError

REPO = Path(__file__).resolve().parents[1]
LOADER_ARGS = dict(batch_size=4, num_workers=0, pin_memory=False, persistent_workers=False)


def signed(img_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img_u8.astype(np.float32) / 127.5 - 1.0)


# ---------------------------------------------------------------------------------------------------------------
# STL10 fixtures: binaries exactly as the official archive stores them


def write_stl10(root: Path, n_train=6, n_test=4, n_unl=5, seed=0) -> dict[str, np.ndarray]:
    """Write stl10_binary/ with images stored channel-wise column-major and labels 1..10; return what was written
    as the user should see it (N x 3 x H x W row-major, labels 0..9)."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unl)):
        imgs = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
        if name == "train":
            imgs[0, 0] = np.arange(96, dtype=np.uint8)[:, None]  # channel 0 of image 0: brightness grows downwards
        (folder / f"{name}_X.bin").write_bytes(imgs.transpose(0, 1, 3, 2).tobytes())  # column-major on disk
        out[f"{name}_X"] = imgs
        if name != "unlabeled":
            labels = rng.integers(0, 10, size=n)
            (folder / f"{name}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
            out[f"{name}_y"] = labels
    (folder / "class_names.txt").write_text("\n".join(stl10.STL10_CLASSES) + "\n")
    (folder / "fold_indices.txt").write_text("\n".join(f"{i % n_train} {(i + 2) % n_train}" for i in range(10)) + "\n")
    return out


def stl10_dm(root: Path, **kw) -> STL10DataModule:
    kw.setdefault("verify", "none")
    kw.setdefault("flip", False)
    return STL10DataModule(root, **LOADER_ARGS, **kw)


@pytest.mark.parametrize("reader", ["pread", "memmap"])
def test_stl10_images_come_back_row_major_with_0_based_labels(tmp_path, reader):
    data = write_stl10(tmp_path)
    dm = stl10_dm(tmp_path, reader=reader)
    dm.setup("fit")
    ds = dm.train_set
    assert len(ds) == 6
    for i in range(6):
        sample = ds[i]
        torch.testing.assert_close(sample["x"], signed(data["train_X"][i]), rtol=0, atol=1e-6)
        assert sample["label"] == data["train_y"][i]
    # the gradient image: rows (dim -2) vary, columns do not -> the column-major storage was transposed
    ch0 = ds[0]["x"][0]
    assert torch.all(ch0[1:, 0] > ch0[:-1, 0]) and torch.all(ch0[0, :] == ch0[0, 0])


def test_stl10_batches_follow_the_contract(tmp_path):
    write_stl10(tmp_path)
    dm = stl10_dm(tmp_path, flip=True)
    assert dm.num_classes == 10 and dm.class_names[2] == "car" and dm.sample_shape == (3, 96, 96)
    assert dm.prompts[0] == "a photo of a airplane" and len(dm.prompts) == 10
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "label"}
    assert batch["x"].shape == (4, 3, 96, 96) and batch["x"].dtype == torch.float32
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
    assert len(dm.val_dataloader().dataset) == 4  # val_split="test"


def test_stl10_unlabeled_images_get_the_null_label(tmp_path):
    data = write_stl10(tmp_path)
    dm = stl10_dm(tmp_path, split="train+unlabeled")
    dm.setup("fit")
    ds = dm.train_set
    assert len(ds) == 6 + 5
    labels = [ds[i]["label"] for i in range(len(ds))]
    assert labels[:6] == list(data["train_y"]) and labels[6:] == [10] * 5
    torch.testing.assert_close(ds[8]["x"], signed(data["unlabeled_X"][2]), rtol=0, atol=1e-6)

    dm = stl10_dm(tmp_path, split="unlabeled", val_split=None)
    dm.setup("fit")
    assert [dm.train_set[i]["label"] for i in range(5)] == [10] * 5
    assert dm.val_dataloader() == []


def test_stl10_resize_on_the_fly(tmp_path):
    write_stl10(tmp_path)
    folder = tmp_path / "stl10_binary"
    raw = bytearray((folder / "train_X.bin").read_bytes())
    raw[: 3 * 96 * 96] = bytes([200]) * (3 * 96 * 96)  # image 0 is a constant colour
    (folder / "train_X.bin").write_bytes(bytes(raw))
    dm = stl10_dm(tmp_path, image_size=48)
    assert dm.sample_shape == (3, 48, 48)
    dm.setup("fit")
    x = dm.train_set[0]["x"]
    assert x.shape == (3, 48, 48)
    torch.testing.assert_close(x, torch.full_like(x, 200 / 127.5 - 1), rtol=0, atol=1e-5)
    y = dm.train_set[1]["x"]
    assert y.min() >= -1 and y.max() <= 1


def test_stl10_held_out_validation_comes_from_labelled_images(tmp_path):
    write_stl10(tmp_path, n_train=10, n_unl=20)
    dms = [stl10_dm(tmp_path, split="train+unlabeled", val_split=0.3) for _ in range(2)]
    for dm in dms:
        dm.setup("fit")
    train_idx, val_idx = dms[0].train_set.indices, dms[0].val_set.indices
    assert len(val_idx) == 3 and set(val_idx) <= set(range(10))  # labelled part only
    assert not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == 30
    np.testing.assert_array_equal(val_idx, dms[1].val_set.indices)  # seeded: every rank/run agrees
    assert all(dms[0].val_set[i]["label"] < 10 for i in range(3))


def test_stl10_fold_selects_official_indices(tmp_path):
    data = write_stl10(tmp_path)
    dm = stl10_dm(tmp_path, fold=3)
    dm.setup("fit")
    ds = dm.train_set
    assert list(ds.indices) == [3, 5]
    torch.testing.assert_close(ds[1]["x"], signed(data["train_X"][5]), rtol=0, atol=1e-6)


def test_stl10_missing_data_error_says_where_and_how(tmp_path):
    dm = stl10_dm(tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "nowhere" / "stl10_binary") in msg and "train_X.bin" in msg
    assert "datamodule.download=true" in msg and "datamodule.data_dir=" in msg


def test_stl10_missing_unlabeled_file_only_matters_when_used(tmp_path):
    write_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "unlabeled_X.bin").unlink()
    stl10_dm(tmp_path).setup("fit")  # train + test only: fine
    with pytest.raises(DataNotFoundError, match="missing unlabeled_X.bin"):
        stl10_dm(tmp_path, split="train+unlabeled").setup("fit")


@pytest.mark.parametrize(
    "damage, name",
    [("truncate_x", "train_X.bin"), ("short_y", "train_y.bin"), ("bad_label", "train_y.bin")],
)
def test_stl10_corrupt_files_are_named(tmp_path, damage, name):
    write_stl10(tmp_path)
    folder = tmp_path / "stl10_binary"
    if damage == "truncate_x":
        os.truncate(folder / "train_X.bin", 6 * 3 * 96 * 96 - 100)
    elif damage == "short_y":
        os.truncate(folder / "train_y.bin", 5)
    else:
        (folder / "train_y.bin").write_bytes(bytes([1, 2, 11, 4, 5, 6]))
    with pytest.raises(CorruptDataError) as info:
        stl10_dm(tmp_path).setup("fit")
    assert name in str(info.value) and "\n" not in str(info.value)


def test_stl10_official_sizes_are_checked_by_default(tmp_path):
    write_stl10(tmp_path)
    with pytest.raises(CorruptDataError, match=r"train_X\.bin has 165888 bytes, expected 138240000"):
        STL10DataModule(tmp_path, **LOADER_ARGS).setup("fit")


def test_stl10_md5_checked_once_then_remembered(tmp_path, monkeypatch):
    write_stl10(tmp_path)
    folder = tmp_path / "stl10_binary"
    table = {
        n: (p.stat().st_size, hashlib.md5(p.read_bytes()).hexdigest()) for n in stl10.STL10_FILES for p in [folder / n]
    }
    monkeypatch.setattr(stl10, "STL10_FILES", table)
    hashed: list[str] = []
    real_md5 = image_common.file_md5
    monkeypatch.setattr(image_common, "file_md5", lambda p: hashed.append(Path(p).name) or real_md5(p))

    STL10DataModule(tmp_path, **LOADER_ARGS).setup("fit")  # train + test (validation) files
    assert sorted(hashed) == ["test_X.bin", "test_y.bin", "train_X.bin", "train_y.bin"]
    assert (folder / image_common.MARKER_NAME).is_file()

    hashed.clear()
    STL10DataModule(tmp_path, **LOADER_ARGS).setup("fit")  # second start: stat only
    assert hashed == []

    # same size, new content and mtime -> re-hashed, mismatch named
    raw = bytearray((folder / "test_X.bin").read_bytes())
    raw[0] ^= 0xFF
    (folder / "test_X.bin").write_bytes(bytes(raw))
    st = (folder / "test_X.bin").stat()
    os.utime(folder / "test_X.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(CorruptDataError, match=r"test_X\.bin has md5 .* expected"):
        STL10DataModule(tmp_path, **LOADER_ARGS).setup("fit")
    assert hashed == ["test_X.bin"]


def test_marker_falls_back_to_user_cache_when_data_dir_is_not_writable(tmp_path, monkeypatch):
    write_stl10(tmp_path / "data")
    folder = tmp_path / "data" / "stl10_binary"
    (folder / image_common.MARKER_NAME).mkdir()  # the marker path cannot be written (even as root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    table = {
        n: (p.stat().st_size, hashlib.md5(p.read_bytes()).hexdigest()) for n in stl10.STL10_FILES for p in [folder / n]
    }
    monkeypatch.setattr(stl10, "STL10_FILES", table)
    hashed: list[str] = []
    real_md5 = image_common.file_md5
    monkeypatch.setattr(image_common, "file_md5", lambda p: hashed.append(p) or real_md5(p))
    for _ in range(2):
        STL10DataModule(tmp_path / "data", val_split=None, **LOADER_ARGS).setup("fit")
    assert len(hashed) == 2  # train_X, train_y once
    assert len(list((tmp_path / "cache" / "difflab" / "verified").glob("*.json"))) == 1


@pytest.mark.parametrize("reader", ["pread", "memmap"])
def test_stl10_dataset_pickles_without_image_data_and_works_in_workers(tmp_path, reader):
    data = write_stl10(tmp_path, n_train=16)
    dm = STL10DataModule(
        tmp_path, verify="none", flip=False, batch_size=8, num_workers=2, pin_memory=False, reader=reader
    )
    dm.setup("fit")
    ds = dm.train_set
    ds[0]  # opens the memory map in this process
    assert len(pickle.dumps(ds)) < 3 * 96 * 96  # less than one image: data is never shipped to workers
    batches = list(dm.train_dataloader())
    assert sum(len(b["label"]) for b in batches) == 16
    got = torch.cat([b["label"] for b in batches]).sort().values
    torch.testing.assert_close(got, torch.from_numpy(np.sort(data["train_y"])))


def test_stl10_accepts_the_stl10_binary_folder_itself(tmp_path):
    write_stl10(tmp_path)
    dm = stl10_dm(tmp_path / "stl10_binary")
    dm.setup("fit")
    assert len(dm.train_set) == 6


# ---------------------------------------------------------------------------------------------------------------
# CIFAR fixtures


class Py2StylePickler(pickle._Pickler):  # type: ignore[misc,name-defined]
    """Writes `bytes` as BINSTRING opcodes, as Python 2's cPickle wrote `str`: the official CIFAR files' format."""

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]
    dispatch[bytes] = save_bytes


def dump_py2(obj, path: Path) -> None:
    with open(path, "wb") as f:
        Py2StylePickler(f, protocol=2).dump(obj)


def write_cifar10(root: Path, per_batch=2, n_test=3, seed=0, names=None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=per_batch).tolist()
        dump_py2(
            {
                b"batch_label": b"training batch %d of 5" % i,
                b"labels": y,
                b"data": x,
                b"filenames": [b"a.png"] * per_batch,
            },
            folder / f"data_batch_{i}",
        )
        xs.append(x)
        ys += y
    tx = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    ty = rng.integers(0, 10, size=n_test).tolist()
    dump_py2({b"batch_label": b"testing batch 1 of 1", b"labels": ty, b"data": tx}, folder / "test_batch")
    names = names or ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump_py2(
        {b"num_cases_per_batch": 10000, b"label_names": [n.encode() for n in names], b"num_vis": 3072},
        folder / "batches.meta",
    )
    return {"train_x": np.concatenate(xs), "train_y": np.array(ys), "test_x": tx, "test_y": np.array(ty)}


def write_cifar100(root: Path, n_train=7, n_test=3, seed=1) -> dict[str, np.ndarray]:
    """CIFAR-100 pickles with bytes keys (what `pickle.load(f, encoding='bytes')` users re-save)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x, b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]}, f, protocol=4)
        out[f"{name}_x"], out[f"{name}_y"] = x, np.array(fine)
    with open(folder / "meta", "wb") as f:
        pickle.dump(
            {
                b"fine_label_names": [n.encode() for n in CIFAR100_CLASSES],
                b"coarse_label_names": [b"c%d" % i for i in range(20)],
            },
            f,
            protocol=4,
        )
    return out


def test_py2_style_pickle_decodes_like_the_official_files(tmp_path):
    write_cifar10(tmp_path)
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert b"\x55\x04data" in raw  # SHORT_BINSTRING 'data': a Python 2 str key
    entry = load_cifar_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    assert {"data", "labels", "batch_label"} <= set(entry) and entry["data"].dtype == np.uint8


def test_cifar10_images_labels_and_meta_names(tmp_path):
    names = [f"class{i}" for i in range(10)]
    data = write_cifar10(tmp_path, names=names)
    dm = CIFAR10DataModule(tmp_path, verify="none", flip=False, **LOADER_ARGS)
    assert dm.class_names == names and dm.num_classes == 10 and dm.prompts[3] == "a photo of a class3"
    dm.setup("fit")
    assert len(dm.train_set) == 10 and len(dm.val_set) == 3
    for i in (0, 3, 9):
        torch.testing.assert_close(
            dm.train_set[i]["x"], signed(data["train_x"][i].reshape(3, 32, 32)), rtol=0, atol=1e-6
        )
        assert dm.train_set[i]["label"] == data["train_y"][i]
    # row-major planes: pixel (row 1, col 0) of the red plane is byte 32
    assert dm.train_set[0]["x"][0, 1, 0] == pytest.approx(data["train_x"][0][32] / 127.5 - 1)
    batch = next(iter(dm.val_dataloader()))
    assert batch["x"].shape == (3, 3, 32, 32) and batch["label"].dtype == torch.int64
    assert batch["label"].tolist() == data["test_y"].tolist()


def test_cifar100_bytes_keys_fine_labels_and_resize(tmp_path):
    data = write_cifar100(tmp_path)
    dm = CIFAR100DataModule(tmp_path, verify="none", image_size=64, **LOADER_ARGS)
    assert dm.num_classes == 100 and dm.class_names[1] == "aquarium_fish"
    assert dm.prompts[1] == "a photo of a aquarium fish" and dm.sample_shape == (3, 64, 64)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, 3, 64, 64) and batch["x"].min() >= -1 and batch["x"].max() <= 1
    labels = [dm.train_set[i]["label"] for i in range(7)]
    assert labels == data["train_y"].tolist()


def test_cifar_holdout_validation(tmp_path):
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(tmp_path, verify="none", val_split=0.2, **LOADER_ARGS)
    dm.setup("fit")
    tr, va = set(dm.train_set.indices), set(dm.val_set.indices)
    assert len(va) == 2 and len(tr) == 8 and not tr & va


def test_cifar_missing_data_error(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        CIFAR100DataModule(tmp_path, **LOADER_ARGS).setup("fit")
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "cifar-100-python") in msg
    assert "missing train" in msg and "datamodule.download=true" in msg


def test_cifar_truncated_pickle_is_named(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(CorruptDataError, match="data_batch_3"):
        CIFAR10DataModule(tmp_path, verify="none", **LOADER_ARGS).setup("fit")


def test_cifar_pickle_cannot_run_code(tmp_path):
    write_cifar10(tmp_path)
    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(target),))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil()}, f)
    with pytest.raises(CorruptDataError, match=r"test_batch .*posix\.mkdir is not allowed"):
        CIFAR10DataModule(tmp_path, verify="none", **LOADER_ARGS).setup("test")
    assert not target.exists()


def test_cifar_md5_is_checked_by_default(tmp_path):
    write_cifar10(tmp_path)  # not the official bytes
    with pytest.raises(CorruptDataError, match=r"data_batch_1 has md5 .* expected c99cafc152244af753f735de768cd75f"):
        CIFAR10DataModule(tmp_path, **LOADER_ARGS).setup("fit")


# ---------------------------------------------------------------------------------------------------------------
# image folder


def half_white(w: int, h: int, mode="RGB") -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = 255  # left half white
    return Image.fromarray(arr).convert(mode)


def test_image_folder_with_class_subfolders(tmp_path):
    for cls, n in (("dogs", 3), ("cats", 2)):
        (tmp_path / cls / "nested").mkdir(parents=True)
        for i in range(n):
            half_white(40 + 10 * i, 30).save(tmp_path / cls / ("nested" if i else ".") / f"{i}.png")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(tmp_path, image_size=16, flip=False, val_fraction=0.0, **LOADER_ARGS)
    assert dm.class_names == ["cats", "dogs"] and dm.num_classes == 2
    assert dm.prompts == ["a photo of a cats", "a photo of a dogs"] and dm.sample_shape == (3, 16, 16)
    dm.setup("fit")
    ds = dm.train_set
    assert len(ds) == 5 and [ds[i]["label"] for i in range(5)] == [0, 0, 1, 1, 1]
    x = ds[4]["x"]  # 60x30 resized to 32x16 then centre-cropped to 16x16: still white-left, dark-right
    assert x.shape == (3, 16, 16)
    assert x[:, :, :3].min() > 0.9 and x[:, :, -3:].max() < -0.9
    assert dm.val_dataloader() == []
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].dtype == torch.int64 and batch["x"].min() >= -1 and batch["x"].max() <= 1


def test_flat_image_folder_is_unconditional_with_val_split(tmp_path):
    for i in range(10):
        half_white(20, 20, mode="RGBA" if i % 2 else "RGB").save(tmp_path / f"{i:02d}.png")
    dm = ImageFolderDataModule(tmp_path, image_size=20, val_fraction=0.2, **LOADER_ARGS)
    assert dm.num_classes is None and dm.class_names is None and dm.prompts is None
    dm.setup()
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2 and dm.test_set is dm.val_set
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x"} and batch["x"].shape == (4, 3, 20, 20)


def test_image_folder_grayscale(tmp_path):
    (tmp_path / "a").mkdir()
    half_white(24, 24).save(tmp_path / "a" / "x.jpg")
    dm = ImageFolderDataModule(tmp_path, image_size=12, channels=1, val_fraction=0.0, **LOADER_ARGS)
    dm.setup("fit")
    x = dm.train_set[0]["x"]
    assert x.shape == (1, 12, 12) and dm.sample_shape == (1, 12, 12)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"image folder not found at .*missing.*datamodule\.data_dir="):
        ImageFolderDataModule(tmp_path / "missing", image_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="no images"):
        ImageFolderDataModule(tmp_path / "empty", image_size=8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dm = ImageFolderDataModule(tmp_path / "bad", image_size=8, val_fraction=0.0, **LOADER_ARGS)
    dm.setup("fit")
    with pytest.raises(CorruptDataError, match="broken.png"):
        dm.train_set[0]


# ---------------------------------------------------------------------------------------------------------------
# transforms and configs


def test_transform_flip_and_resize():
    img = torch.zeros(3, 10, 12, dtype=torch.uint8)
    img[:, :, :4] = 255  # bright left strip, partly inside the central 10x10 crop
    t = ImageTransform(image_size=10, flip=True)
    torch.manual_seed(0)
    outs = [t(img) for _ in range(20)]
    lefts = {bool(o[0, 0, 0] > 0) for o in outs}
    assert lefts == {True, False}  # both orientations occur
    for o in outs:
        assert o.shape == (3, 10, 10)
        torch.testing.assert_close(
            o if o[0, 0, 0] > 0 else o.flip(-1), outs[0] if outs[0][0, 0, 0] > 0 else outs[0].flip(-1)
        )
    assert resize_shorter_side(torch.ones(1, 8, 16), 4).shape == (1, 4, 8)
    assert class_prompts(None) is None


@pytest.mark.parametrize("name", ["stl10", "cifar10", "cifar100", "image_folder"])
def test_configs_instantiate(tmp_path, name):
    from hydra.utils import instantiate

    cfg = OmegaConf.load(REPO / "configs" / "datamodule" / f"{name}.yaml")
    cfg = OmegaConf.merge({"paths": {"data_dir": str(tmp_path)}}, {"dm": cfg})
    if name == "image_folder":
        (tmp_path / "images").mkdir()
        half_white(8, 8).save(tmp_path / "images" / "a.png")
    dm = instantiate(cfg.dm, num_workers=0)
    assert dm.batch_size == 64 and dm.sample_shape[0] in (1, 3)
    expected = {"stl10": 10, "cifar10": 10, "cifar100": 100, "image_folder": None}[name]
    assert dm.num_classes == expected
