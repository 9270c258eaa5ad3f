"""Allowed values of the datamodule group (configs/datamodule/*.yaml), checked by difflab.config_checks before a job
starts; a rule applies only when its key is present (each datamodule has its own keys). Also checks the datamodule
overrides of report.yaml. Data locations are not checked here: the datamodules report missing data in one line."""

from difflab.config_checks import (
    Rule,
    any_of,
    boolean,
    integer,
    list_of,
    number,
    one_of,
    optional,
    positive,
    probability,
    string,
)

SIZE = integer(min=1)
HW = list_of(integer(min=1), length=2)
DIRECTIONS = ("left", "right", "up", "down")  # src/datamodules/moving_digits.py
VIDEO_TARGETS = ("MovingDigitsDataModule", "SignVideoDataModule")
NATIVE_SIZE = ("CIFAR10DataModule", "CIFAR100DataModule", "STL10DataModule")  # image_size null: native

RULES = {
    # loaders (src/datamodules/image_common.py and the others)
    "batch_size": integer(min=1),
    "num_workers": integer(min=0),
    "pin_memory": boolean(),
    "persistent_workers": boolean(),
    "drop_last": boolean(),
    "shuffle": boolean(),
    "seed": integer(min=0),
    # images
    "image_size": optional(any_of(SIZE, HW)).described_as("an integer >= 1 (video datamodules: also [h, w] or null)"),
    "flip": boolean(),
    "download": boolean(),
    "verify": one_of(["md5", "size", "none"]),
    "val_fraction": probability(max_open=True),
    # cifar / stl10: test | a fraction held out from train | null; sign videos: a split name
    "val_split": optional(any_of(string(nonempty=True), number(min=0, max=1, max_open=True))),
    "train_split": optional(string(nonempty=True)),
    "test_split": optional(string(nonempty=True)),
    "split": one_of(["train", "unlabeled", "train+unlabeled", "test"]),  # stl10
    "fold": optional(integer(min=0, max=9)),
    "reader": one_of(["pread", "memmap"]),
    "channels": one_of([1, 3, 4]),
    "class_folders": optional(boolean()),
    "extensions": optional(list_of(string(nonempty=True), min_len=1)),
    "on_bad_item": one_of(["error", "skip"]),  # image_folder: unreadable images
    "data_dir": string(nonempty=True),
    "cache_dir": string(nonempty=True).described_as(
        "a latent cache, latent shards or clip shards directory (difflab-encode-latents / difflab-prepare-clips)"
    ),
    # sharded latents (src/datamodules/streaming_latents.py)
    "download_dir": optional(string(nonempty=True)),
    "max_cache_size": optional(any_of(integer(min=1), string(nonempty=True))).described_as(
        "a size such as 50GB, a number of bytes, or null"
    ),
    "storage_options": optional(Rule(lambda v: isinstance(v, dict), "a mapping of options for the storage")),
    "return_index": boolean(),
    # videos (moving_digits, sign_video)
    "num_frames": integer(min=1),
    "frame_stride": integer(min=1),
    "target_fps": optional(positive()),
    "fps": positive(),
    "num_train": integer(min=1),
    "num_val": integer(min=1),
    "num_test": integer(min=1),
    "canvas_size": integer(min=4),
    "digit_size": integer(min=4),
    "codec": string(),
    "prompt_pairs": optional(
        list_of(
            Rule(
                lambda p: isinstance(p, list) and len(p) == 2 and p[0] in range(10) and p[1] in DIRECTIONS,
                "[digit 0-9, left|right|up|down]",
            ),
            min_len=1,
        )
    ),
    "cache": boolean(),
    "backend": one_of(["pyav", "torchcodec"]),
    "strict": boolean(),
    "dataset": one_of(["how2sign", "phoenix"]),
    "text_field": optional(string(nonempty=True)),
    "layout": one_of(["clips", "raw"]),
    "clips_dir": string(nonempty=True),
    "raw_dir": string(nonempty=True),
    "csv_name": optional(string(nonempty=True)),
    "num_prompts": integer(min=1),
    "prompts": optional(list_of(string())),
    # variable-length video (src/datamodules/buckets.py)
    "min_frames": optional(integer(min=2)),
    "buckets": optional(list_of(integer(min=1), min_len=1)),
    "max_frames": optional(integer(min=1)),
    "bucket_resolutions": optional(list_of(any_of(integer(min=1), HW), min_len=1)),
    "bucket_batch": one_of(["scale", "fixed"]),
}


def _target(dm: dict) -> str:
    return str(dm.get("_target_", "")).rsplit(".", 1)[-1]


def image_size_for_images(dm: dict):
    """Image datamodules take one integer size (cifar / stl10 also null: the native size); only the video ones take
    [h, w] (src/datamodules/*.py)."""
    size, target = dm.get("image_size"), _target(dm)
    if "image_size" not in dm or "_target_" not in dm or target in VIDEO_TARGETS:
        return None
    if isinstance(size, list) or (size is None and target not in NATIVE_SIZE):
        return "image_size", "an integer >= 1" + (" or null (the native size)" if target in NATIVE_SIZE else "")
    return None


def val_split_for_images(dm: dict):
    """cifar / stl10: val_split is `test`, a fraction in (0, 1) of train, or null (src/datamodules/image_common.py)."""
    split = dm.get("val_split")
    if "_target_" in dm and _target(dm) not in VIDEO_TARGETS and isinstance(split, str) and split != "test":
        return "val_split", "test, a fraction in (0, 1) or null"
    return None


def moving_digits_geometry(dm: dict):
    """Moving digits: the digit fits the canvas, and motion needs two frames (src/datamodules/moving_digits.py)."""
    if _target(dm) != "MovingDigitsDataModule":
        return None
    canvas, digit = dm.get("canvas_size"), dm.get("digit_size")
    if isinstance(canvas, int) and isinstance(digit, int) and digit > canvas:
        return "digit_size", f"an integer in [4, canvas_size={canvas}]"
    if isinstance(dm.get("num_frames"), int) and dm["num_frames"] < 2:
        return "num_frames", "an integer >= 2 (motion needs two frames)"
    return None


def buckets_within_max_frames(dm: dict):
    """Bucket lengths may not exceed max_frames; moving digits' min_frames may not exceed num_frames."""
    buckets, most = dm.get("buckets"), dm.get("max_frames")
    if isinstance(buckets, list) and isinstance(most, int) and any(isinstance(b, int) and b > most for b in buckets):
        return "buckets", f"frame counts <= datamodule.max_frames={most}"
    if buckets is None and isinstance(most, int) and isinstance(dm.get("num_frames"), int) and most < dm["num_frames"]:
        return "max_frames", f"an integer >= datamodule.num_frames={dm['num_frames']} (or null)"
    low, n = dm.get("min_frames"), dm.get("num_frames")
    if isinstance(low, int) and isinstance(n, int) and low > n:
        return "min_frames", f"an integer in [2, num_frames={n}] (or null)"
    return None


CHECKS = [image_size_for_images, val_split_for_images, moving_digits_geometry, buckets_within_max_frames]
