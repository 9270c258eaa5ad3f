"""Variable-length video: clips grouped into (frames, height, width) buckets instead of one fixed-length crop.

A *bucket* is ``Bucket(frames, height, width)``. Every training clip goes to one bucket, decided once from its length
(read from the container, not decoded) and its frame size:

- frames: the largest bucket length ``<=`` the clip's usable length (the number of output frames its whole duration
  gives at the sampling step: ``floor((n - 1) / step) + 1`` for ``n`` source frames, ``step`` = ``frame_stride`` or
  ``source fps / target_fps``); the clip is cropped to that length (a random window when training, as before).
  Clips shorter than the smallest bucket go to the smallest one and repeat their last frame (what the fixed-length
  path does with short clips), so no clip is left out;
- resolution: the largest (by area) bucket resolution that the clip's frames cover (``h >= H`` and ``w >= W``:
  no upscaling), or the smallest one when the clip covers none.

A bucket length above every clip's length, or a resolution no clip covers, is a configuration mistake and fails
with one line naming the bucket and the range of clip lengths / sizes (`check_buckets`).

`BucketBatchSampler` makes the batches: the clips of one bucket, shuffled per epoch with ``(seed, epoch)``, cut
into batches of that bucket's batch size; the batches of all buckets are shuffled together, and rank ``r`` of ``W``
takes batches ``r, r + W, ...``. Every rank gets the same number of batches: when the total is not a multiple of
``W``, the largest batches are split in two (no clip is dropped or repeated; with ``drop_last`` the partial
batches of each bucket and the remainder batches are dropped instead). The sampler is resumable mid-epoch:
``state_dict()`` holds the epoch, the seed and how many batches this rank's iterator has handed out; torchdata's
``StatefulDataLoader`` saves it (the batch sampler is its ``_index_sampler``, saved when it has ``state_dict`` /
``load_state_dict``) and a resumed iterator continues with the next batch.

Batch size per bucket (`bucket_batch_sizes`, rule ``"scale"``): frames x pixels x batch stays about constant,
``batch(T, H, W) = max(1, floor(batch_size * T0 * H0 * W0 / (T * H * W)))`` with ``(T0, H0, W0)`` the configured
``num_frames`` and ``image_size`` and ``batch_size`` the configured batch size (Open-Sora's bucket configs give a
hand-tuned batch size per (resolution, frames) that follows the same line, e.g. v1.2 stage 1 at 144p: 51 frames x
51, 102 x 27, 204 x 13, 408 x 6). Rule ``"fixed"``: the configured batch size everywhere.

The sampler yields `BucketSample` keys ``(index, frames, height, width)``; a dataset that supports buckets reads
clip ``index`` at that length and size and adds ``"num_frames"`` to the sample (`collate_buckets` checks that a
batch is one bucket and stacks it).
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate

from difflab.ops.atomic import atomic_write
from difflab.utils.errors import ConfigError, DataNotFoundError
from difflab.video.io import list_frame_files, probe_video

log = logging.getLogger(__name__)

BATCH_RULES = ("scale", "fixed")


# ---------------------------------------------------------------------------------------------------- buckets
@dataclass(frozen=True, order=True)
class Bucket:
    """Clips of ``frames`` frames of ``height x width`` pixels."""

    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


class BucketSample(NamedTuple):
    """What `BucketBatchSampler` yields per sample: clip ``index`` read at ``frames`` frames of ``height x width``."""

    index: int
    frames: int
    height: int
    width: int


@dataclass(frozen=True)
class ClipInfo:
    """What the container says about a clip, before decoding: source frames (of the clip's range), rate, size."""

    num_frames: int
    fps: float
    height: int
    width: int


def resolve_frame_buckets(
    num_frames: int, buckets: Sequence[int] | None = None, max_frames: int | None = None, multiple: int = 1
) -> list[int] | None:
    """The bucket lengths of a datamodule config, or None when bucketing is off (both keys null: every clip is one
    ``num_frames`` crop, the default).

    ``buckets`` given: those lengths (sorted, distinct), each ``<= max_frames`` when that is set. Only ``max_frames``
    given: ``num_frames, 2 num_frames, ...`` up to ``max_frames``. Every length must be a multiple of ``multiple``
    (a video transformer's tubelet size).
    """
    if buckets is None and max_frames is None:
        return None
    if max_frames is not None and (isinstance(max_frames, bool) or int(max_frames) < 1):
        raise ConfigError(f"datamodule.max_frames must be a positive frame count or null, got {max_frames!r}")
    if buckets is None:
        if int(max_frames) < int(num_frames):
            raise ConfigError(
                f"datamodule.max_frames={max_frames} is below datamodule.num_frames={num_frames}: "
                "clips could not reach the configured length"
            )
        out = list(range(int(num_frames), int(max_frames) + 1, int(num_frames)))
    else:
        if isinstance(buckets, (str, bytes)) or not len(buckets):
            raise ConfigError(f"datamodule.buckets must be a non-empty list of frame counts or null, got {buckets!r}")
        bad = [b for b in buckets if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1]
        if bad:
            raise ConfigError(f"datamodule.buckets must hold positive frame counts, got {list(buckets)}")
        out = sorted({int(b) for b in buckets})
        if max_frames is not None and out[-1] > int(max_frames):
            raise ConfigError(
                f"datamodule.buckets={out} has lengths above datamodule.max_frames={max_frames}; "
                "drop them or raise max_frames"
            )
    off = [b for b in out if b % int(multiple)]
    if off:
        raise ConfigError(f"bucket lengths {off} are not multiples of {multiple} (the model's tubelet size)")
    return out


def usable_frames(source_frames: int, step: float) -> int:
    """Output frames a clip of ``source_frames`` frames gives at ``step`` source frames per output frame (the longest
    window `difflab.datamodules.sign_video.window_indices` can take without repeating a frame); 0 for empty clips."""
    if source_frames <= 0:
        return 0
    return int(math.floor((source_frames - 1) / float(step) + 1e-6)) + 1


def _pair(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = (int(v) for v in size)
    return h, w


def _range(values: Sequence[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def check_buckets(
    lengths: Sequence[int],
    sizes: Sequence[tuple[int, int]] | None,
    frames: Sequence[int],
    resolutions: Sequence[tuple[int, int]],
    what: str = "clips",
) -> None:
    """Fail with one line when a bucket length is above every clip's length or a resolution fits no clip (clips of
    length 0 / size 0 x 0, unreadable ones, are left out of both)."""
    lengths = [int(n) for n in lengths if n > 0]
    sizes = None if sizes is None else [s for s in sizes if s[0] > 0 and s[1] > 0]
    if not lengths:
        raise DataNotFoundError(f"none of the {what} could be read to measure its length; check the files")
    longest = max(lengths)
    over = [f for f in frames if f > longest]
    if over:
        raise ConfigError(
            f"bucket length {over[0]} frames fits no clip: the {len(lengths)} {what} have "
            f"{_range(lengths)} frames at the sampling step; use bucket lengths <= {longest} "
            "(datamodule.buckets / datamodule.max_frames)"
        )
    if sizes is not None and len(resolutions) > 1:
        for h, w in resolutions:
            if not any(sh >= h and sw >= w for sh, sw in sizes):
                raise ConfigError(
                    f"bucket resolution {h}x{w} fits no clip: the {len(sizes)} {what} are "
                    f"{_range([s[0] for s in sizes])} x {_range([s[1] for s in sizes])} pixels; "
                    "use smaller bucket resolutions"
                )


def assign_buckets(
    lengths: Sequence[int],
    frames: Sequence[int],
    resolutions: Sequence[Any],
    sizes: Sequence[tuple[int, int]] | None = None,
    what: str = "clips",
) -> list[Bucket]:
    """The bucket of every clip (see the module docstring); ``lengths`` are usable lengths in output frames,
    ``resolutions`` the bucket sizes (ints or ``(h, w)``), ``sizes`` the clips' native ``(h, w)`` (None: every clip
    covers every resolution, the largest is taken). Checks `check_buckets` first."""
    frames = sorted({int(f) for f in frames})
    if not frames or not len(resolutions):
        raise ConfigError("bucketing needs at least one bucket length and one resolution")
    res = [_pair(r) for r in resolutions]
    res = sorted(set(res), key=lambda r: (r[0] * r[1], r))
    check_buckets(lengths, sizes, frames, res, what)
    lens = np.asarray(lengths, dtype=np.int64)
    # largest bucket length <= the clip's length; shorter clips -> the smallest bucket (padded by the reader)
    pos = np.searchsorted(np.asarray(frames), lens, side="right") - 1
    chosen = np.asarray(frames)[np.maximum(pos, 0)]
    out = []
    for k, t in enumerate(chosen.tolist()):
        h, w = res[0]
        if sizes is not None and len(res) > 1:
            sh, sw = sizes[k]
            fitting = [r for r in res if sh >= r[0] and sw >= r[1]]
            h, w = fitting[-1] if fitting else res[0]
        elif len(res) > 1:
            h, w = res[-1]
        out.append(Bucket(int(t), h, w))
    return out


def bucket_batch_sizes(
    buckets: Sequence[Bucket], batch_size: int, base_frames: int, base_size: Any, rule: str = "scale"
) -> dict[Bucket, int]:
    """Batch size of every bucket: ``"scale"`` keeps frames x pixels x batch about that of the configured
    ``batch_size`` clips of ``base_frames`` x ``base_size`` (at least 1); ``"fixed"`` uses ``batch_size``."""
    if rule not in BATCH_RULES:
        raise ConfigError(f"datamodule.bucket_batch must be one of {BATCH_RULES}, got {rule!r}")
    bh, bw = _pair(base_size)
    budget = int(batch_size) * int(base_frames) * bh * bw
    out = {}
    for b in sorted(set(buckets)):
        out[b] = int(batch_size) if rule == "fixed" else max(1, int(budget // (b.frames * b.height * b.width)))
    return out


def frame_usage(lengths: Sequence[int], frames_used: Sequence[int]) -> float:
    """Fraction of the clips' usable frames fed to the model: ``sum(min(length, used)) / sum(length)``."""
    lens = np.asarray(lengths, dtype=np.float64)
    used = np.minimum(lens, np.asarray(frames_used, dtype=np.float64))
    return float(used.sum() / max(lens.sum(), 1.0))


def summarize(buckets: Sequence[Bucket], batch_sizes: dict[Bucket, int]) -> str:
    """One log line: clips and batch size per bucket."""
    counts: dict[Bucket, int] = {}
    for b in buckets:
        counts[b] = counts.get(b, 0) + 1
    return ", ".join(f"{b}: {counts[b]} clips x batch {batch_sizes[b]}" for b in sorted(counts))


# ---------------------------------------------------------------------------------------------- clip probing
def _frames_in_folder(source: str) -> list[str]:
    return list_frame_files(source)


def _probe_one(rec: Any, backend: str, default_fps: float) -> ClipInfo | None:
    """Source frame count (of the record's [start, end) range), fps and size of one clip record, or None when the
    container cannot be read (the dataset skips such clips when it meets them)."""
    try:
        if getattr(rec, "kind", "video") == "frames":
            from PIL import Image

            files = _frames_in_folder(rec.source)
            fps = float(getattr(rec, "fps", None) or default_fps)
            if rec.start is not None or rec.end is not None:
                a = int(round((rec.start or 0.0) * fps))
                b = len(files) if rec.end is None else int(round(rec.end * fps))
                files = files[a:b]
            if not files:
                return None
            with Image.open(files[0]) as im:
                return ClipInfo(len(files), fps, im.height, im.width)
        info = probe_video(rec.source, backend)
        if rec.start is None and rec.end is None:
            n = info.num_frames
        else:  # the reader's rule (SignVideoDataset._read_video)
            c0 = rec.start or 0.0
            if c0 >= info.duration:
                return None
            c1 = info.duration if rec.end is None else min(rec.end, info.duration)
            n = max(1, int(math.floor((c1 - c0) * info.fps + 1e-6)))
        return ClipInfo(int(n), float(info.fps), int(info.height), int(info.width))
    except (OSError, ValueError, RuntimeError) as e:  # av.error.* derive from these
        log.debug("cannot probe %s: %s", getattr(rec, "source", rec), e)
        return None
    except Exception as e:  # noqa: BLE001 - decoders raise many types; a bad file must not stop the index
        if type(e).__module__.startswith("av"):
            return None
        raise


def _stat_key(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}"


def probe_clips(
    records: Sequence[Any],
    *,
    backend: str = "pyav",
    default_fps: float = 25.0,
    workers: int = 4,
    cache_file: str | os.PathLike | None = None,
) -> list[ClipInfo | None]:
    """`ClipInfo` of every record (``source``, ``start``, ``end``, ``kind``, ``fps`` attributes, as
    `difflab.datamodules.sign_video.ClipRecord`), read from the containers (headers only; a raw video shared by many
    sentences is opened once). ``cache_file``: a JSON file remembering the results per file version (size, mtime),
    so a restart does not open tens of thousands of files again."""
    cache: dict[str, Any] = {}
    if cache_file is not None:
        try:
            cache = json.loads(Path(cache_file).read_text())
            cache = cache if isinstance(cache, dict) else {}
        except (OSError, ValueError):
            cache = {}
    keys = [f"{r.source}|{r.start}|{r.end}|{getattr(r, 'kind', 'video')}|{backend}" for r in records]
    todo: dict[str, Any] = {}
    stamps: dict[str, str] = {}
    for k, r in zip(keys, records):
        stamps.setdefault(r.source, _stat_key(r.source))
        hit = cache.get(k)
        if not (isinstance(hit, dict) and hit.get("stamp") == stamps[r.source]):
            todo.setdefault(k, r)
    if todo:
        items = list(todo.items())
        with ThreadPoolExecutor(max(1, int(workers))) as pool:
            infos = list(pool.map(lambda kv: _probe_one(kv[1], backend, default_fps), items))
        for (k, r), info in zip(items, infos):
            cache[k] = {"stamp": stamps[r.source], "info": None if info is None else list(vars(info).values())}
        if cache_file is not None:
            try:
                payload = json.dumps(cache)
                atomic_write(cache_file, lambda tmp: Path(tmp).write_text(payload))
            except OSError as e:
                log.warning(
                    "could not write the clip-length cache %s (%s); lengths will be read again next time", cache_file, e
                )
    out = []
    for k in keys:
        info = cache[k]["info"]
        out.append(None if info is None else ClipInfo(int(info[0]), float(info[1]), int(info[2]), int(info[3])))
    return out


# --------------------------------------------------------------------------------------------------- sampler
class EpochClock(Sampler[int]):
    """The epoch and seed of a `BucketBatchSampler` (its ``sampler``): Lightning calls ``set_epoch`` on
    ``loader.batch_sampler.sampler`` every epoch, and difflab's resumable loader restores ``epoch`` / ``seed`` there.
    Iterating gives ``0 .. n - 1`` (the order is the batch sampler's business)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


class BucketBatchSampler(BatchSampler):
    """Batches of same-bucket clips (see the module docstring); yields lists of `BucketSample`.

    ``buckets``: the bucket of every clip (`assign_buckets`); ``batch_sizes``: per bucket (`bucket_batch_sizes`).
    Ranks: ``num_replicas`` / ``rank`` when given, else those of ``sampler`` when it is a ``DistributedSampler``
    (Lightning injects one under DDP by rebuilding this sampler with ``sampler=``; its order is not used), else
    ``torch.distributed``'s, else one process. The epoch is ``sampler.epoch``.
    """

    def __init__(
        self,
        sampler: Sampler | None = None,
        buckets: Sequence[Bucket | Sequence[int]] = (),
        batch_sizes: dict | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        # BatchSampler.__init__ is not called: it needs one batch size
        self.clip_buckets = [b if isinstance(b, Bucket) else Bucket(*(int(v) for v in b)) for b in buckets]
        if not self.clip_buckets:
            raise ConfigError("BucketBatchSampler needs the bucket of at least one clip")
        sizes = dict(batch_sizes or {})
        self.batch_sizes = {(b if isinstance(b, Bucket) else Bucket(*b)): int(v) for b, v in sizes.items()}
        missing = sorted({b for b in self.clip_buckets if b not in self.batch_sizes})
        if missing or any(v < 1 for v in self.batch_sizes.values()):
            raise ConfigError(
                f"BucketBatchSampler: no positive batch size for bucket(s) {', '.join(map(str, missing))}"
                if missing
                else f"BucketBatchSampler: batch sizes must be >= 1, got {sizes}"
            )
        self.sampler = sampler if sampler is not None else EpochClock(len(self.clip_buckets), seed)
        self._seed = int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        if (num_replicas is None) != (rank is None):
            raise ConfigError("BucketBatchSampler: give both num_replicas and rank, or neither")
        if num_replicas is not None and not 0 <= int(rank) < int(num_replicas):
            raise ConfigError(f"BucketBatchSampler: rank {rank} is outside 0..{int(num_replicas) - 1}")
        self.num_replicas = None if num_replicas is None else int(num_replicas)
        self.rank = None if rank is None else int(rank)
        self._groups: dict[Bucket, np.ndarray] = {}
        for i, b in enumerate(self.clip_buckets):
            self._groups.setdefault(b, []).append(i)  # type: ignore[attr-defined]
        self._groups = {b: np.asarray(v, dtype=np.int64) for b, v in sorted(self._groups.items())}
        self._plan_cache: tuple | None = None
        self._yielded = 0  # batches handed out by the current iterator (the resumable position)
        self._resume_at = 0  # set by load_state_dict, used by the next iter()

    # ------------------------------------------------------------------------------------------ ranks and epoch
    def world(self) -> tuple[int, int]:
        """``(rank, world_size)`` this sampler serves."""
        if self.num_replicas is not None:
            return int(self.rank), self.num_replicas
        if isinstance(self.sampler, DistributedSampler):
            return int(self.sampler.rank), int(self.sampler.num_replicas)
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    @property
    def seed(self) -> int:
        """The shuffle seed; kept on the `EpochClock` when there is one (the resumable loader restores it there)."""
        return int(self.sampler.seed) if isinstance(self.sampler, EpochClock) else self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed = int(value)
        if isinstance(self.sampler, EpochClock):
            self.sampler.seed = int(value)

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(int(epoch))

    # ------------------------------------------------------------------------------------------------ the plan
    def plan(self, epoch: int | None = None, world_size: int | None = None) -> list[tuple[Bucket, np.ndarray]]:
        """Every batch of the epoch, all ranks together, in order: ``(bucket, clip indices)``. Rank ``r`` takes
        entries ``r, r + W, ...``. Deterministic in (seed, epoch, world size)."""
        epoch = self.epoch if epoch is None else int(epoch)
        world = self.world()[1] if world_size is None else int(world_size)
        key = (self.seed, epoch, world, self.shuffle, self.drop_last)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, epoch & 0xFFFFFFFFFFFFFFFF])
        batches: list[tuple[Bucket, np.ndarray]] = []
        for b, idx in self._groups.items():
            if self.shuffle:
                idx = idx[rng.permutation(len(idx))]
            bs = self.batch_sizes[b]
            for start in range(0, len(idx), bs):
                chunk = idx[start : start + bs]
                if self.drop_last and len(chunk) < bs:
                    continue
                batches.append((b, chunk))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        extra = (-len(batches)) % world
        if extra and self.drop_last:
            batches = batches[: len(batches) - (len(batches) % world)]
        elif extra:
            batches = _split_to_multiple(batches, world)
        if not batches:
            raise ConfigError(
                f"{len(self.clip_buckets)} clips make no batch for {world} rank(s)"
                + (" with drop_last (lower the batch size)" if self.drop_last else "")
            )
        self._plan_cache = (key, batches)
        return batches

    def __len__(self) -> int:
        rank, world = self.world()
        return len(self.plan(world_size=world)) // world

    def __iter__(self) -> Iterator[list[BucketSample]]:
        rank, world = self.world()
        mine = self.plan(world_size=world)[rank::world]
        start, self._resume_at = min(self._resume_at, len(mine)), 0
        self._yielded = start
        return self._generate(mine, start)

    def _generate(self, mine, start: int) -> Iterator[list[BucketSample]]:
        for k in range(start, len(mine)):
            b, idx = mine[k]
            self._yielded = k + 1
            yield [BucketSample(int(i), b.frames, b.height, b.width) for i in idx.tolist()]

    # ------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Epoch, seed, world size and the number of batches this rank's current iterator has handed out."""
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "world_size": self.world()[1],
            "yielded": int(self._yielded),
            "num_clips": len(self.clip_buckets),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the saved batch on the next ``iter()`` (the saved epoch; a different world size or
        dataset restarts that epoch from its first batch, with a warning)."""
        if not state:
            return
        self.seed = int(state.get("seed", self.seed))
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(int(state.get("epoch", self.epoch)))
        same = int(state.get("world_size", 1)) == self.world()[1] and int(
            state.get("num_clips", len(self.clip_buckets))
        ) == len(self.clip_buckets)
        if not same:
            log.warning(
                "bucket sampler state was saved with %s ranks / %s clips, resuming with %d / %d: the "
                "interrupted epoch restarts from its first batch",
                state.get("world_size"),
                state.get("num_clips"),
                self.world()[1],
                len(self.clip_buckets),
            )
        self._resume_at = int(state.get("yielded", 0)) if same else 0


def _split_to_multiple(batches: list[tuple[Bucket, np.ndarray]], world: int) -> list[tuple[Bucket, np.ndarray]]:
    """Split the largest batches (first in order among equals) in two until the count is a multiple of ``world``;
    the halves stay next to each other. Fails when there are fewer clips than needed batches."""
    batches = list(batches)
    need = (-len(batches)) % world
    total = sum(len(c) for _, c in batches)
    if total < len(batches) + need:
        raise ConfigError(
            f"{total} clips cannot give each of {world} ranks the same number of batches; use fewer "
            "ranks or set datamodule.drop_last=true"
        )
    for _ in range(need):
        k = max(range(len(batches)), key=lambda j: (len(batches[j][1]), -j))
        b, c = batches[k]
        half = (len(c) + 1) // 2
        batches[k : k + 1] = [(b, c[:half]), (b, c[half:])]
    return batches


# ---------------------------------------------------------------------------------------------------- collate
def collate_buckets(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collate after checking that every sample has the same clip shape (one bucket); ``num_frames``
    becomes an int64 tensor of the batch's frame counts."""
    shapes = {tuple(s["x"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(
            f"a bucketed batch mixes clip shapes {sorted(shapes)}; the dataset must read each "
            "BucketSample at its bucket's frames and size"
        )
    return default_collate(samples)


def batch_frames(batch: dict[str, Any]) -> torch.Tensor | None:
    """The frame count of each sample of a batch (``batch["num_frames"]``), or None when the batch carries none."""
    n = batch.get("num_frames") if isinstance(batch, dict) else None
    if n is None:
        return None
    return torch.as_tensor(n).reshape(-1)
