"""Moving digits: the offline, embedded text-to-video dataset, stored in the How2Sign layout.

Each clip shows one of scikit-learn's bundled 8x8 handwritten digits (upsampled) crossing a black canvas from one
edge to the opposite one, captioned "the digit three moving left". Clips are written as How2Sign sentence clips
(``<split>_rgb_front_clips/raw_videos/<SENTENCE_NAME>.mp4`` plus tab-separated ``how2sign_<split>.csv`` with the real
header), so training on them runs the real How2Sign reader. ``manifest.json`` records the generation parameters
(the data are regenerated when they change) and the ground truth (digit, direction) of every clip.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from difflab.datamodules.digits import DIGIT_NAMES
from difflab.datamodules.sign_video import HOW2SIGN_CLIPS_DIR, SignVideoDataModule
from difflab.utils.errors import ConfigError, disk_full, is_disk_full
from difflab.utils.images import round_to_uint8
from difflab.video.io import mp4_encoder, write_mp4

log = logging.getLogger(__name__)

DIRECTIONS = ("left", "right", "up", "down")
MANIFEST = "manifest.json"
GENERATOR = "difflab.moving_digits"
FORMAT_VERSION = 1
HOW2SIGN_HEADER = ("VIDEO_ID", "VIDEO_NAME", "SENTENCE_ID", "SENTENCE_NAME", "START", "END", "SENTENCE")
# two prompts per direction, eight different digits: the default sample grid
DEFAULT_PROMPT_PAIRS = (
    (0, "right"),
    (1, "left"),
    (2, "down"),
    (3, "up"),
    (4, "right"),
    (5, "left"),
    (6, "down"),
    (7, "up"),
)


def caption(digit: int, direction: str) -> str:
    """The caption of a clip: ``caption(3, "left") == "the digit three moving left"``."""
    if direction not in DIRECTIONS or not 0 <= int(digit) <= 9:
        raise ValueError(f"caption: need a digit 0-9 and a direction in {DIRECTIONS}, got {digit!r}, {direction!r}")
    return f"the digit {DIGIT_NAMES[int(digit)]} moving {direction}"


def parse_caption(text: str) -> tuple[int, str] | None:
    """Inverse of `caption`: ``(digit, direction)``, or None if ``text`` is not a moving-digits caption."""
    words = text.strip().lower().split()
    if len(words) != 5 or words[:2] != ["the", "digit"] or words[3] != "moving":
        return None
    if words[2] not in DIGIT_NAMES or words[4] not in DIRECTIONS:
        return None
    return DIGIT_NAMES.index(words[2]), words[4]


def prompts_for(pairs: Sequence[Sequence[Any]]) -> list[str]:
    """Captions for a list of ``(digit, direction)`` pairs (e.g. the prompts of an evaluation grid)."""
    return [caption(int(d), str(m)) for d, m in pairs]


@dataclass(frozen=True)
class MovingDigitsParams:
    """Everything that determines the generated files; a change regenerates the data."""

    canvas_size: int = 32
    digit_size: int = 14
    num_frames: int = 8
    fps: float = 8.0
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 200
    seed: int = 0
    codec: str = "mpeg4"  # mpeg4 (q=2) writes ~2x faster than libx264 for tiny clips; "" = best available
    min_frames: int | None = None  # variable-length clips: lengths uniform in [min_frames, num_frames]; None = fixed

    def resolved(self) -> "MovingDigitsParams":
        """The same parameters with the encoder name filled in and checked."""
        if self.digit_size > self.canvas_size or self.digit_size < 4:
            raise ConfigError(
                f"moving digits: digit_size must be in [4, canvas_size={self.canvas_size}], got {self.digit_size}"
            )
        if self.num_frames < 2:
            raise ConfigError(f"moving digits: num_frames must be >= 2 to show motion, got {self.num_frames}")
        if self.min_frames is not None and not 2 <= self.min_frames <= self.num_frames:
            raise ConfigError(
                f"moving digits: min_frames must be in [2, num_frames={self.num_frames}] or null, got {self.min_frames}"
            )
        if min(self.num_train, self.num_val, self.num_test) < 1:
            raise ConfigError("moving digits: num_train, num_val and num_test must be >= 1")
        return self if self.codec else MovingDigitsParams(**{**asdict(self), "codec": mp4_encoder()})


def digit_sprites(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits upsampled to ``size x size`` uint8 (bilinear) and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return round_to_uint8(x[:, 0].clamp(0, 1) * 255).numpy(), d.target.astype(np.int64)


def render_clip(sprite: np.ndarray, direction: str, cross: int, canvas: int, num_frames: int) -> np.ndarray:
    """``T x canvas x canvas`` uint8: ``sprite`` crossing from one edge to the opposite one in ``direction``.

    ``cross`` is the sprite's fixed offset along the other axis (0 .. canvas - sprite size).
    """
    d = sprite.shape[0]
    travel = canvas - d
    pos = np.round(np.linspace(0, travel, num_frames)).astype(int)
    if direction in ("left", "up"):
        pos = pos[::-1]
    out = np.zeros((num_frames, canvas, canvas), np.uint8)
    for t, p in enumerate(pos):
        y, x = (cross, p) if direction in ("left", "right") else (p, cross)
        out[t, y : y + d, x : x + d] = sprite
    return out


def centre_of_mass(video: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-frame intensity centre of mass ``T x 2`` (row, col) of a grey video.

    Accepts ``T x H x W`` / ``T x H x W x C`` uint8 or a model-space ``C x T x H x W`` tensor in [-1, 1].
    """
    if isinstance(video, torch.Tensor):
        v = video.detach().float().cpu()
        v = ((v.clamp(-1, 1) + 1) / 2).mean(0) if v.is_floating_point() and v.ndim == 4 else v
        v = v.numpy().astype(np.float64)
    else:
        v = np.asarray(video, dtype=np.float64)
        v = v.mean(-1) if v.ndim == 4 else v
    t, h, w = v.shape
    mass = v.sum((1, 2)) + 1e-9
    rows = (v.sum(2) * np.arange(h)).sum(1) / mass
    cols = (v.sum(1) * np.arange(w)).sum(1) / mass
    return np.stack([rows, cols], 1)


def estimate_direction(video: np.ndarray | torch.Tensor) -> str:
    """The direction (left/right/up/down) in which the bright content of a grey video moves, from the centre of
    mass of the last frame minus the first (for checking generated samples against their prompt)."""
    com = centre_of_mass(video)
    dr, dc = com[-1] - com[0]
    if abs(dc) >= abs(dr):
        return "right" if dc > 0 else "left"
    return "down" if dr > 0 else "up"


def read_manifest(data_dir: str | os.PathLike) -> dict | None:
    """The manifest of a generated folder (params + per-clip ground truth), or None if absent/unreadable."""
    try:
        m = json.loads((Path(data_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("generator") == GENERATOR else None


def _manifest_params(params: MovingDigitsParams) -> dict:
    """The parameters as the manifest records them (``min_frames`` only when set, so fixed-length folders written
    before it existed stay valid)."""
    d = asdict(params)
    if d.get("min_frames") is None:
        d.pop("min_frames", None)
    return d


def _up_to_date(data_dir: Path, params: MovingDigitsParams) -> bool:
    m = read_manifest(data_dir)
    return m is not None and m.get("version") == FORMAT_VERSION and m.get("params") == _manifest_params(params)


def _write_split(
    root: Path,
    split: str,
    n: int,
    pool: np.ndarray,
    sprites: np.ndarray,
    labels: np.ndarray,
    p: MovingDigitsParams,
    rng: np.random.Generator,
) -> list[dict]:
    """Render and write ``n`` clips of one split plus its How2Sign CSV; returns the manifest entries."""
    clips_dir = root / HOW2SIGN_CLIPS_DIR.format(split=split)
    clips_dir.mkdir(parents=True)
    by_digit = {k: pool[labels[pool] == k] for k in range(10)}
    entries, lines = [], ["\t".join(HOW2SIGN_HEADER)]
    for i in range(n):
        digit, direction = i % 10, DIRECTIONS[(i // 10) % 4]  # balanced over the 40 captions
        image = int(rng.choice(by_digit[digit]))
        cross = int(rng.integers(0, p.canvas_size - p.digit_size + 1))
        length = p.num_frames if p.min_frames is None else int(rng.integers(p.min_frames, p.num_frames + 1))
        duration = length / p.fps
        frames = render_clip(sprites[image], direction, cross, p.canvas_size, length)
        video_id = f"md-{split}-{i:05d}"
        name = f"{video_id}_0-rgb_front"
        write_mp4(clips_dir / f"{name}.mp4", frames[..., None], p.fps, codec=p.codec, crf=12)
        text = caption(digit, direction)
        lines.append(
            "\t".join([video_id, f"{video_id}-rgb_front", f"{video_id}_0", name, "0.00", f"{duration:.2f}", text])
        )
        entries.append(
            {
                "name": name,
                "split": split,
                "digit": digit,
                "direction": direction,
                "text": text,
                "image_index": image,
                "cross": cross,
                **({} if p.min_frames is None else {"frames": length}),
            }
        )
    (root / f"how2sign_{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return entries


def generate_moving_digits(
    data_dir: str | os.PathLike, params: MovingDigitsParams | None = None, *, force: bool = False
) -> Path:
    """Write the moving-digits dataset under ``data_dir`` unless an identical one is already there.

    Source digit images are split 80/10/10 into train/val/test pools, so validation and test clips show unseen
    handwriting. The folder is built under a temporary name and renamed into place, so concurrent callers (DDP
    ranks) never see a half-written dataset. A folder that exists without our manifest is never overwritten. A disk
    that fills meanwhile raises ``DiskFullError`` naming ``data_dir`` (the partial folder is removed).
    """
    p = (params or MovingDigitsParams()).resolved()
    data_dir = Path(data_dir)
    if not force and _up_to_date(data_dir, p):
        return data_dir
    if data_dir.exists() and any(data_dir.iterdir()) and read_manifest(data_dir) is None:
        raise ConfigError(
            f"{data_dir} exists and is not a moving-digits folder (no {MANIFEST}); "
            "choose another datamodule.data_dir or empty that folder"
        )
    sprites, labels = digit_sprites(p.digit_size)
    rng = np.random.default_rng(p.seed)
    perm = rng.permutation(len(sprites))
    n_val = n_test = len(perm) // 10
    pools = {"val": perm[:n_val], "test": perm[n_val : n_val + n_test], "train": perm[n_val + n_test :]}
    # the whole folder is published by one directory rename (not a file write, so not difflab.ops.atomic); mkdir and
    # the files inside honour the umask already
    tmp = data_dir.parent / f".{data_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        clips = []
        for split, n in (("train", p.num_train), ("val", p.num_val), ("test", p.num_test)):
            clips += _write_split(tmp, split, n, pools[split], sprites, labels, p, rng)
        manifest = {
            "generator": GENERATOR,
            "version": FORMAT_VERSION,
            "params": _manifest_params(p),
            "directions": list(DIRECTIONS),
            "clips": clips,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=0))
        if data_dir.exists():
            if _up_to_date(data_dir, p) and not force:  # another process finished first
                shutil.rmtree(tmp)
                return data_dir
            if read_manifest(data_dir) is not None:
                shutil.rmtree(data_dir)  # our own stale data: safe to replace
            elif not any(data_dir.iterdir()):
                data_dir.rmdir()
        try:
            os.rename(tmp, data_dir)
        except OSError:
            if not _up_to_date(data_dir, p):
                raise
            shutil.rmtree(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):  # one line naming the folder; the clips written so far are gone with tmp
            raise disk_full(data_dir, err) from err
        raise
    log.info("moving digits: wrote %d clips to %s", len(clips), data_dir)
    return data_dir


class MovingDigitsDataModule(SignVideoDataModule):
    """Captioned moving-digit clips (generated on first use) read through the How2Sign reader.

    Defaults keep CPU training fast: 8 frames of 32x32 grey (``channels=1``), 2000/200/200 clips, decoded clips
    cached in memory (``cache=True``). ``prompts`` are the captions of ``prompt_pairs`` (digit, direction), and
    `ground_truth()` returns the per-clip digit and direction from the manifest. ``min_frames`` makes clip lengths
    vary uniformly in [min_frames, num_frames] (the digit crosses the canvas in that many frames), for training with
    ``buckets`` / ``max_frames`` (see `SignVideoDataModule`).
    """

    def __init__(
        self,
        data_dir: str = "data/moving_digits",
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
        canvas_size: int = 32,
        digit_size: int = 14,
        num_frames: int = 8,
        fps: float = 8.0,
        seed: int = 0,
        codec: str = "mpeg4",
        channels: int = 1,
        image_size: int | Sequence[int] | None = None,
        prompt_pairs: Sequence[Sequence[Any]] | None = None,
        cache: bool = True,
        backend: str = "pyav",
        strict: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        drop_last: bool = False,
        min_frames: int | None = None,
        buckets: Sequence[int] | None = None,
        max_frames: int | None = None,
        bucket_batch: str = "scale",
    ):
        self.params = MovingDigitsParams(
            int(canvas_size),
            int(digit_size),
            int(num_frames),
            float(fps),
            int(num_train),
            int(num_val),
            int(num_test),
            int(seed),
            str(codec or ""),
            None if min_frames is None else int(min_frames),
        )
        self.prompt_pairs = [(int(d), str(m)) for d, m in (prompt_pairs or DEFAULT_PROMPT_PAIRS)]
        super().__init__(
            dataset="how2sign",
            data_dir=data_dir,
            num_frames=num_frames,
            image_size=image_size or canvas_size,
            frame_stride=1,
            channels=channels,
            layout="clips",
            strict=strict,
            backend=backend,
            cache=cache,
            prompts=prompts_for(self.prompt_pairs),
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            drop_last=drop_last,
            seed=seed,
            buckets=buckets,
            max_frames=max_frames,
            bucket_batch=bucket_batch,
        )

    def prepare_data(self) -> None:
        """Generate the clips (Lightning calls this on one process per node)."""
        generate_moving_digits(self.data_dir, self.params)

    def setup(self, stage: str | None = None) -> None:
        """Generate if needed (safe when several processes race), then build the splits."""
        generate_moving_digits(self.data_dir, self.params)
        super().setup(stage)

    def ground_truth(self) -> list[dict]:
        """Per-clip ``{name, split, digit, direction, text, image_index, cross}`` from the manifest."""
        m = read_manifest(self.data_dir)
        if m is None:
            generate_moving_digits(self.data_dir, self.params)
            m = read_manifest(self.data_dir)
        return m["clips"]
