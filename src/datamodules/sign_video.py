"""Text-to-sign-language video data: How2Sign and RWTH-PHOENIX-Weather 2014T as captioned clips.

Each dataset has an index builder that reads its annotation file into `ClipRecord`s (one record type for both), a
`SignVideoDataset` turns records into fixed-length clips ``{"x": C x T x H x W in [-1, 1], "text": str}``, and
`SignVideoDataModule` wires both into the batch contract of docs/ARCHITECTURE.md.

Variable-length training (``buckets`` / ``max_frames``, off by default): each training clip is cropped to the largest
bucket length that fits it and batches hold clips of one bucket (`difflab.datamodules.buckets`); validation, test and
``sample_shape`` keep ``num_frames``.

Bad data is skipped and counted, never silently: malformed annotation rows (wrong field count, bad times, bytes that
are not UTF-8, rows the csv module rejects; logged with file and line), listed files that are missing, and videos that
fail to decode (logged once per file, replaced by another clip). With ``strict=True`` each of these raises instead:
one line naming the file (and line).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from difflab.datamodules.buckets import (
    BATCH_RULES,
    Bucket,
    BucketBatchSampler,
    BucketSample,
    assign_buckets,
    bucket_batch_sizes,
    collate_buckets,
    frame_usage,
    probe_clips,
    resolve_frame_buckets,
    summarize,
    usable_frames,
)
from difflab.datamodules.image_common import ImageDataModule, _accelerator_available
from difflab.datamodules.loaders import ResumableDataLoader, _mix
from difflab.ops.rng import WorkerRNGState
from difflab.utils.errors import ConfigError, CorruptDataError, DataNotFoundError
from difflab.video.io import BACKENDS, list_frame_files, open_video, read_frame_files, resize_uint8

log = logging.getLogger(__name__)

_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as errors="surrogateescape" decodes them
MAX_ROW_WARNINGS = 10  # malformed rows logged one by one per file; the rest only in the summary line


@dataclass(frozen=True)
class ClipRecord:
    """One captioned clip: a video file (optionally a [start, end) second range of it) or a folder of frames."""

    source: str
    start: float | None
    end: float | None
    text: str
    split: str
    kind: str  # "video" | "frames"
    fps: float | None = None  # frame folders only (videos carry their own rate)


@dataclass
class IndexReport:
    """The records of one split plus what was skipped while building them."""

    records: list[ClipRecord]
    annotation_file: str
    malformed: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, reason)
    missing: list[str] = field(default_factory=list)  # listed sources that do not exist

    def summary(self) -> str:
        """One line for the start-up log."""
        return (
            f"{len(self.records)} clips from {self.annotation_file} ({len(self.malformed)} malformed rows "
            f"skipped, {len(self.missing)} listed files missing)"
        )


class _RowSkipper:
    """Collects malformed rows of one annotation file: warns (first few), counts, or raises when strict."""

    def __init__(self, path: Path, strict: bool):
        self.path, self.strict = str(path), strict
        self.rows: list[tuple[str, int, str]] = []

    def __call__(self, line: int, reason: str) -> None:
        if self.strict:
            raise CorruptDataError(f"{self.path}:{line}: {reason}; fix the row or set strict=false to skip it")
        self.rows.append((self.path, line, reason))
        if len(self.rows) <= MAX_ROW_WARNINGS:
            log.warning("%s:%d: skipping malformed row: %s", self.path, line, reason)

    def finish(self) -> None:
        if len(self.rows) > MAX_ROW_WARNINGS:
            log.warning("%s: %d malformed rows skipped in total", self.path, len(self.rows))


def _read_rows(path: Path, delimiter: str, skip: _RowSkipper):
    """Yield ``(line_number, fields)`` of a delimited text file read without quote handling (QUOTE_NONE), the
    header first. A later row that is not UTF-8 text (a damaged download) or that the csv module rejects (a field
    over its size limit) goes to ``skip`` with its line number instead: counted, or one error line when strict."""
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE)
        first = True
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                skip(reader.line_num, f"unreadable row ({err})")
                continue
            if not first and _NOT_UTF8.search("".join(row)):
                skip(reader.line_num, "not UTF-8 text")
                continue
            first = False
            yield reader.line_num, row


def _existing_names(folder: Path) -> set[str] | None:
    """File/folder names inside ``folder`` (one listdir instead of one stat per clip); None if it does not exist."""
    try:
        return set(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _filter_missing(
    records: list[ClipRecord], names: set[str], report: IndexReport, strict: bool, what: str
) -> list[ClipRecord]:
    """Drop records whose source is not in ``names``, count them, warn once (or raise when strict)."""
    kept = []
    for r in records:
        if os.path.basename(r.source) in names:
            kept.append(r)
        else:
            if strict:
                raise DataNotFoundError(
                    f"{r.source} is listed in {report.annotation_file} but does not exist; "
                    f"download the missing {what} or set strict=false to skip it"
                )
            report.missing.append(r.source)
    if report.missing:
        log.warning(
            "%s: %d listed %s do not exist and are skipped (first: %s)",
            report.annotation_file,
            len(report.missing),
            what,
            report.missing[0],
        )
    return kept


# ------------------------------------------------------------------------------------------------------------ How2Sign
HOW2SIGN_URL = "https://how2sign.github.io"
HOW2SIGN_CSV_NAMES = ("how2sign_{split}.csv", "how2sign_realigned_{split}.csv")
HOW2SIGN_CLIPS_DIR = "{split}_rgb_front_clips/raw_videos"
HOW2SIGN_RAW_DIR = "{split}_raw_videos/raw_videos"
HOW2SIGN_LAYOUTS = ("clips", "raw")


def find_how2sign_csv(data_dir: str | os.PathLike, split: str, csv_name: str | None = None) -> Path:
    """The How2Sign annotation file of ``split``: ``how2sign_{split}.csv`` (or the realigned name) in ``data_dir``
    or in ``data_dir/{split}_rgb_front_clips``; raises `DataNotFoundError` naming where it looked."""
    data_dir = Path(data_dir)
    names = [csv_name] if csv_name else list(HOW2SIGN_CSV_NAMES)
    folders = [data_dir, data_dir / f"{split}_rgb_front_clips"]
    tried = []
    for folder in folders:
        for name in names:
            p = folder / name.format(split=split)
            tried.append(p)
            if p.is_file():
                return p
    raise DataNotFoundError(
        f"How2Sign {split} annotations not found (looked for {', '.join(str(p) for p in tried[:2])} and "
        f"{len(tried) - 2} more); download the English translation CSVs and rgb_front clips from {HOW2SIGN_URL} "
        "and set datamodule.data_dir to the folder holding them"
    )


def read_how2sign_index(
    data_dir: str | os.PathLike,
    split: str,
    *,
    layout: str = "clips",
    clips_dir: str = HOW2SIGN_CLIPS_DIR,
    raw_dir: str = HOW2SIGN_RAW_DIR,
    csv_name: str | None = None,
    strict: bool = False,
) -> IndexReport:
    """Records of a How2Sign split from its tab-separated CSV.

    ``layout="clips"``: one file per sentence, ``<clips_dir>/<SENTENCE_NAME>.mp4`` (whole file).
    ``layout="raw"``: ``<raw_dir>/<VIDEO_NAME>.mp4`` cut to [START, END) seconds (START_REALIGNED/END_REALIGNED
    in the realigned files). Directory templates may use ``{split}`` and are relative to ``data_dir``.
    """
    if layout not in HOW2SIGN_LAYOUTS:
        raise ConfigError(f"datamodule.layout must be one of {HOW2SIGN_LAYOUTS}, got {layout!r}")
    data_dir = Path(data_dir)
    path = find_how2sign_csv(data_dir, split, csv_name)
    skip = _RowSkipper(path, strict)
    rows = _read_rows(path, "\t", skip)
    try:
        _, header = next(rows)
    except StopIteration:
        raise CorruptDataError(f"{path} is empty; download it again from {HOW2SIGN_URL}") from None
    header = [h.strip() for h in header]
    col = {h: i for i, h in enumerate(header)}
    start_key = "START_REALIGNED" if "START_REALIGNED" in col else "START"
    end_key = "END_REALIGNED" if "END_REALIGNED" in col else "END"
    needed = ["VIDEO_NAME", "SENTENCE_NAME", "SENTENCE"] + ([start_key, end_key] if layout == "raw" else [])
    lacking = [k for k in needed if k not in col]
    if lacking:
        raise CorruptDataError(
            f"{path}: header lacks column(s) {', '.join(lacking)} (got {', '.join(header)}); "
            "is this a tab-separated How2Sign CSV?"
        )
    has_times = start_key in col and end_key in col
    folder = data_dir / (clips_dir if layout == "clips" else raw_dir).format(split=split)
    records = []
    for line, row in rows:
        if not any(v.strip() for v in row):
            continue  # blank line
        if len(row) != len(header):
            skip(line, f"expected {len(header)} tab-separated fields, got {len(row)}")
            continue
        start = end = None
        if has_times:
            try:
                start, end = float(row[col[start_key]]), float(row[col[end_key]])
            except ValueError:
                skip(line, f"non-numeric {start_key}/{end_key} {row[col[start_key]]!r}/{row[col[end_key]]!r}")
                continue
            if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
                skip(line, f"invalid time range {start_key}={start} {end_key}={end}")
                continue
        text = row[col["SENTENCE"]].strip()
        name = row[col["SENTENCE_NAME" if layout == "clips" else "VIDEO_NAME"]].strip()
        if not text or not name:
            skip(line, "empty SENTENCE" if not text else "empty file name")
            continue
        if layout == "clips":
            records.append(ClipRecord(str(folder / f"{name}.mp4"), None, None, text, split, "video"))
        else:
            records.append(ClipRecord(str(folder / f"{name}.mp4"), start, end, text, split, "video"))
    skip.finish()
    report = IndexReport([], str(path), malformed=skip.rows)
    names = _existing_names(folder)
    if names is None:
        raise DataNotFoundError(
            f"How2Sign {split} videos not found: {folder} does not exist; download the "
            f"{'rgb_front clips' if layout == 'clips' else 'raw videos'} from {HOW2SIGN_URL} "
            f"or set datamodule.{'clips_dir' if layout == 'clips' else 'raw_dir'}"
        )
    report.records = _filter_missing(records, names, report, strict, "videos")
    return report


# ------------------------------------------------------------------------------------------------------------- PHOENIX
PHOENIX_URL = "https://www-i6.informatik.rwth-aachen.de/~koller/RWTH-PHOENIX-2014-T/"
PHOENIX_FPS = 25.0
PHOENIX_TEXT_FIELDS = ("translation", "orth")
PHOENIX_FRAMES = "features/fullFrame-210x260px"


def find_phoenix_root(data_dir: str | os.PathLike) -> Path:
    """The ``PHOENIX-2014-T`` folder (holding ``annotations/`` and ``features/``) at or below ``data_dir``."""
    data_dir = Path(data_dir)
    candidates = [data_dir, data_dir / "PHOENIX-2014-T", data_dir / "PHOENIX-2014-T-release-v3" / "PHOENIX-2014-T"]
    for c in candidates:
        if (c / "annotations" / "manual").is_dir():
            return c
    raise DataNotFoundError(
        f"RWTH-PHOENIX-Weather 2014T not found: no PHOENIX-2014-T/annotations/manual under {data_dir}; download "
        f"phoenix-2014-T.v3.tar.gz from {PHOENIX_URL} and extract it into datamodule.data_dir"
    )


def read_phoenix_index(
    data_dir: str | os.PathLike, split: str, *, text_field: str = "translation", strict: bool = False
) -> IndexReport:
    """Records of a PHOENIX-2014-T split (train/dev/test) from its ``|``-separated corpus file.

    Frames are read from ``features/fullFrame-210x260px/<split>/<name>/`` (the ``video`` column's
    ``<name>/1/*.png`` is not where the release puts them); text is the German ``translation`` or the ``orth`` gloss.
    """
    if text_field not in PHOENIX_TEXT_FIELDS:
        raise ConfigError(f"datamodule.text_field must be one of {PHOENIX_TEXT_FIELDS} for PHOENIX, got {text_field!r}")
    root = find_phoenix_root(data_dir)
    path = root / "annotations" / "manual" / f"PHOENIX-2014-T.{split}.corpus.csv"
    if not path.is_file():
        raise DataNotFoundError(
            f"PHOENIX-2014-T {split} annotations not found at {path}; splits are train/dev/test "
            f"(download from {PHOENIX_URL})"
        )
    skip = _RowSkipper(path, strict)
    rows = _read_rows(path, "|", skip)
    try:
        _, header = next(rows)
    except StopIteration:
        raise CorruptDataError(f"{path} is empty; extract the PHOENIX release again") from None
    header = [h.strip() for h in header]
    col = {h: i for i, h in enumerate(header)}
    lacking = [k for k in ("name", text_field) if k not in col]
    if lacking:
        raise CorruptDataError(
            f"{path}: header lacks column(s) {', '.join(lacking)} (got {'|'.join(header)}); "
            "expected name|video|start|end|speaker|orth|translation"
        )
    frames_dir = root / PHOENIX_FRAMES / split
    records = []
    for line, row in rows:
        if not any(v.strip() for v in row):
            continue
        if len(row) != len(header):
            skip(line, f"expected {len(header)} '|'-separated fields, got {len(row)}")
            continue
        name, text = row[col["name"]].strip(), row[col[text_field]].strip()
        if not name or not text:
            skip(line, "empty name" if not name else f"empty {text_field}")
            continue
        records.append(ClipRecord(str(frames_dir / name), None, None, text, split, "frames", PHOENIX_FPS))
    skip.finish()
    report = IndexReport([], str(path), malformed=skip.rows)
    names = _existing_names(frames_dir)
    if names is None:
        raise DataNotFoundError(
            f"PHOENIX-2014-T {split} frames not found: {frames_dir} does not exist; extract the "
            f"full release (with features/) from {PHOENIX_URL}"
        )
    report.records = _filter_missing(records, names, report, strict, "frame folders")
    return report


# ------------------------------------------------------------------------------------------------------------- clips
def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(v) for v in size)
    return h, w


def window_indices(
    n: int, num_frames: int, step: float, *, random: bool, generator: torch.Generator | None = None
) -> np.ndarray:
    """Indices of ``num_frames`` frames spaced ``step`` apart (fractional for fps resampling) in a clip of ``n``.

    The window starts at a random frame (training) or is centred (evaluation). Clips shorter than the window
    repeat their last frame.
    """
    span = (num_frames - 1) * step + 1
    room = n - span
    if room <= 0:
        offset = 0
    elif random:
        offset = int(torch.randint(0, int(math.floor(room + 1e-9)) + 1, (), generator=generator))
    else:
        offset = int(math.floor(room / 2 + 1e-9))
    idx = np.floor(offset + np.arange(num_frames) * step + 1e-6).astype(np.int64)
    return np.minimum(idx, n - 1)


def fit_size(h: int, w: int, out: tuple[int, int]) -> tuple[int, int] | None:
    """The size to shrink an ``h x w`` frame to so that it just covers ``out`` (keeping the aspect), or None when
    the frame is not larger than needed (no shrinking)."""
    scale = max(out[0] / h, out[1] / w)
    if scale >= 1:
        return None
    return max(out[0], round(h * scale)), max(out[1], round(w * scale))


def crop_resize(frames: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """Centre-crop uint8 ``T x H x W x C`` frames to the aspect of ``out`` and resize to ``out`` (antialiased
    bilinear; skipped when the crop already has that size)."""
    h, w = frames.shape[1:3]
    s = min(h / out[0], w / out[1])
    ch, cw = min(h, round(out[0] * s)), min(w, round(out[1] * s))
    top, left = (h - ch) // 2, (w - cw) // 2
    frames = frames[:, top : top + ch, left : left + cw]
    if (ch, cw) != tuple(out):
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        frames = resize_uint8(x, out).permute(0, 2, 3, 1).numpy()
    return frames


def to_channels(frames: np.ndarray, channels: int) -> np.ndarray:
    """RGB uint8 ``T x H x W x 3`` to ``channels`` (3, or 1 = ITU-R BT.601 luma, rounded)."""
    if channels == 3:
        return frames
    f = frames.astype(np.int32)
    luma = (299 * f[..., 0] + 587 * f[..., 1] + 114 * f[..., 2] + 500) // 1000
    return luma.astype(np.uint8)[..., None]


def to_model_space(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``T x H x W x C`` to the contract's float ``C x T x H x W`` in [-1, 1] (numpy: no thread start-up)."""
    x = np.ascontiguousarray(frames.transpose(3, 0, 1, 2), dtype=np.float32)
    x /= 127.5
    x -= 1.0
    return torch.from_numpy(x)


_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, ImportError, AssertionError)


class SignVideoDataset(WorkerRNGState, Dataset):
    """Captioned fixed-length clips from `ClipRecord`s: ``{"x": float C x T x H x W in [-1, 1], "text": str}``.

    ``num_frames`` frames are taken ``frame_stride`` source frames apart, or resampled to ``target_fps`` (which
    overrides the stride), from a random window (``train=True``) or the centred one. Frames are shrunk while
    decoding, centre-cropped to the aspect of ``image_size`` and resized to it. ``cache=True`` keeps every decoded
    clip (all its frames, already resized) in memory: for small datasets such as moving digits.

    Unreadable sources are logged once, counted in `num_unreadable` / `unreadable_files` (shared across loader
    workers) and replaced by the next readable clip; ``strict=True`` raises `CorruptDataError` instead.
    """

    def __init__(
        self,
        records: Sequence[ClipRecord],
        *,
        num_frames: int = 16,
        frame_stride: int = 1,
        target_fps: float | None = None,
        image_size: int | Sequence[int] = 64,
        channels: int = 3,
        train: bool = True,
        backend: str = "pyav",
        strict: bool = False,
        cache: bool = False,
        default_fps: float = 25.0,
    ):
        if not records:
            raise ConfigError("SignVideoDataset needs at least one clip record")
        if int(num_frames) < 1 or int(frame_stride) < 1:
            raise ConfigError(f"num_frames and frame_stride must be >= 1, got {num_frames}, {frame_stride}")
        if target_fps is not None and float(target_fps) <= 0:
            raise ConfigError(f"target_fps must be positive or null, got {target_fps}")
        if int(channels) not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels}")
        if backend not in BACKENDS:
            raise ConfigError(f"video backend must be one of {BACKENDS}, got {backend!r}")
        self.records = list(records)
        self.num_frames, self.frame_stride = int(num_frames), int(frame_stride)
        self.target_fps = None if target_fps is None else float(target_fps)
        self.image_size = _pair(image_size)
        self.channels, self.train, self.backend = int(channels), bool(train), backend
        self.strict, self.cache, self.default_fps = bool(strict), bool(cache), float(default_fps)
        # shared memory: DataLoader workers flag bad files here and the main process sees the flags
        self._bad = torch.zeros(len(self.records), dtype=torch.bool).share_memory_()
        self._warned: set[int] = set()
        self._cache: dict[Any, tuple[np.ndarray, float]] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_unreadable(self) -> int:
        """How many sources failed to decode so far (in any loader worker)."""
        return int(self._bad.sum())

    @property
    def unreadable_files(self) -> list[str]:
        """The sources that failed to decode so far."""
        return [self.records[i].source for i in self._bad.nonzero().flatten().tolist()]

    def _step(self, fps: float) -> float:
        return float(self.frame_stride) if self.target_fps is None else fps / self.target_fps

    # --- decoding -------------------------------------------------------------------------------------------------
    def _finish(self, frames: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 T x H x W x 3 -> uint8 T x h x w x C at the output size (``size`` or ``image_size``) and channels."""
        return np.ascontiguousarray(to_channels(crop_resize(frames, size or self.image_size), self.channels))

    def _read_video(
        self, rec: ClipRecord, whole: bool, num_frames: int | None = None, size: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, float]:
        num_frames, size = num_frames or self.num_frames, size or self.image_size
        with open_video(rec.source, self.backend) as reader:
            info = reader.info
            fps = info.fps
            c0 = rec.start or 0.0
            if rec.start is None and rec.end is None:
                n = info.num_frames
            else:
                if c0 >= info.duration:
                    raise ValueError(f"clip start {c0:.2f}s is past the end of the video ({info.duration:.2f}s)")
                c1 = info.duration if rec.end is None else min(rec.end, info.duration)
                n = max(1, int(math.floor((c1 - c0) * fps + 1e-6)))
            idx = np.arange(n) if whole else window_indices(n, num_frames, self._step(fps), random=self.train)
            want = c0 + idx / fps
            frames, times = reader.frames_in_range(
                want.min() - 0.5 / fps, want.max() + 0.5 / fps, fit_size(info.height, info.width, size)
            )
        if len(frames) == 0:
            raise ValueError(f"no frames decoded in [{want.min():.2f}s, {want.max():.2f}s]")
        pick = np.abs(times[None, :] - want[:, None]).argmin(1)
        return self._finish(frames[pick], size), fps

    def _read_frames(
        self, rec: ClipRecord, whole: bool, num_frames: int | None = None, size: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, float]:
        from PIL import Image

        num_frames, size = num_frames or self.num_frames, size or self.image_size
        files = list_frame_files(rec.source)
        fps = rec.fps or self.default_fps
        if rec.start is not None or rec.end is not None:
            a = int(round((rec.start or 0.0) * fps))
            b = len(files) if rec.end is None else int(round(rec.end * fps))
            files = files[a:b]
        if not files:
            raise ValueError("no frame images in range")
        n = len(files)
        idx = np.arange(n) if whole else window_indices(n, num_frames, self._step(fps), random=self.train)
        with Image.open(files[0]) as im:
            shrink = fit_size(im.height, im.width, size)
        frames = read_frame_files([files[i] for i in idx.tolist()], size=shrink)
        return self._finish(frames, size), fps

    def _clip(self, i: int, num_frames: int | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
        rec = self.records[i]
        read = self._read_video if rec.kind == "video" else self._read_frames
        num_frames = num_frames or self.num_frames
        size = tuple(size) if size else self.image_size
        if not self.cache:
            frames, _ = read(rec, False, num_frames, size)
        else:
            key = i if size == self.image_size else (i, size)  # bucket resolutions are cached separately
            if key not in self._cache:
                self._cache[key] = read(rec, True, None, size)
            full, fps = self._cache[key]
            frames = full[window_indices(len(full), num_frames, self._step(fps), random=self.train)]
        return to_model_space(frames)

    def __getitem__(self, index: int | BucketSample) -> dict[str, Any]:
        """Clip ``index`` at ``num_frames`` x ``image_size``; a `BucketSample` (bucketed training loader) gives the
        clip's own length and size, and the sample then carries ``"num_frames"``."""
        frames = size = None
        if isinstance(index, BucketSample):
            index, frames, size = index.index, index.frames, (index.height, index.width)
        n = len(self.records)
        last_error = None
        for k in range(n):
            i = (int(index) + k) % n
            if self._bad[i]:
                continue
            try:
                x = self._clip(i, frames, size)
            except _PROGRAMMING_ERRORS:
                raise
            except Exception as e:  # decoders raise many types (av.error.*, OSError, ValueError, PIL errors)
                rec = self.records[i]
                if self.strict:
                    raise CorruptDataError(
                        f"{rec.source}: cannot read clip ({type(e).__name__}: {e}); replace the "
                        "file or set strict=false to skip unreadable clips"
                    ) from e
                if i not in self._warned and not self._bad[i]:
                    log.warning("skipping unreadable clip %s (%s: %s)", rec.source, type(e).__name__, e)
                self._warned.add(i)
                self._bad[i] = True
                last_error = f"{rec.source}: {type(e).__name__}: {e}"
                continue
            sample = {"x": x, "text": self.records[i].text}
            if frames is not None:
                sample["num_frames"] = int(x.shape[1])
            return sample
        raise CorruptDataError(
            f"none of the {n} clips could be read (last error {last_error}); check the video files and the backend"
        )


# --------------------------------------------------------------------------------------------------------- datamodule
SIGN_DATASETS = {
    # dataset: (train, val, test split names, default text field)
    "how2sign": (("train", "val", "test"), "SENTENCE"),
    "phoenix": (("train", "dev", "test"), "translation"),
}


def first_distinct(texts: Sequence[str], n: int) -> list[str]:
    """The first ``n`` distinct strings of ``texts``, in order."""
    seen: dict[str, None] = {}
    for t in texts:
        if len(seen) >= n:
            break
        seen.setdefault(t, None)
    return list(seen)


class SignVideoDataModule(ImageDataModule):
    """How2Sign or PHOENIX-2014T clips as dict batches ``{x: B x C x T x H x W in [-1, 1], text: list[str]}``.

    Contract attributes (set here, before `setup`): ``num_classes=None``, ``class_names=None``,
    ``sample_shape=(C, T, H, W)`` and ``prompts`` = the first ``num_prompts`` distinct validation sentences (or the
    ``prompts`` given), used for sample grids. Reading the validation annotations here means a missing dataset
    fails at construction with a `DataNotFoundError` naming where it looked.

    Skipped data is counted: `data_report()` gives, per split, the malformed rows, missing files and unreadable
    videos met so far.

    Variable-length training clips: ``buckets`` (frame counts) and/or ``max_frames`` (with ``buckets`` null:
    ``num_frames, 2 num_frames, ...`` up to it) turn them on; ``bucket_resolutions`` adds frame sizes (each clip takes
    the largest it covers) and ``bucket_batch`` sets the batch size per bucket (``scale``: batch x frames x pixels
    about ``batch_size x num_frames x image_size``; ``fixed``). The training loader then uses a
    `difflab.datamodules.buckets.BucketBatchSampler` and its batches carry ``num_frames`` (int64 B). Clip lengths
    are read from the containers once (`train_buckets`, at ``setup("fit")``) and remembered in
    ``.difflab_clip_info_<split>.json`` in ``data_dir`` (or the user cache); `bucket_report` gives the fraction of
    frames used with buckets and with one ``num_frames`` crop.
    """

    def __init__(
        self,
        dataset: str = "how2sign",
        data_dir: str = "data/how2sign",
        num_frames: int = 16,
        image_size: int | Sequence[int] = 64,
        frame_stride: int = 1,
        target_fps: float | None = None,
        channels: int = 3,
        text_field: str | None = None,
        layout: str = "clips",
        clips_dir: str = HOW2SIGN_CLIPS_DIR,
        raw_dir: str = HOW2SIGN_RAW_DIR,
        csv_name: str | None = None,
        train_split: str | None = None,
        val_split: str | None = None,
        test_split: str | None = None,
        strict: bool = False,
        backend: str = "pyav",
        cache: bool = False,
        num_prompts: int = 8,
        prompts: Sequence[str] | None = None,
        batch_size: int = 8,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        buckets: Sequence[int] | None = None,
        max_frames: int | None = None,
        bucket_resolutions: Sequence[Any] | None = None,
        bucket_batch: str = "scale",
    ):
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            drop_last=drop_last,
            seed=seed,
        )
        if dataset not in SIGN_DATASETS:
            raise ConfigError(f"datamodule.dataset must be one of {sorted(SIGN_DATASETS)}, got {dataset!r}")
        (tr, va, te), default_text = SIGN_DATASETS[dataset]
        if dataset == "how2sign" and text_field not in (None, "SENTENCE"):
            raise ConfigError(f"How2Sign has one text column (SENTENCE); got datamodule.text_field={text_field!r}")
        if backend not in BACKENDS:
            raise ConfigError(f"datamodule.backend must be one of {BACKENDS}, got {backend!r}")
        if int(channels) not in (1, 3):
            raise ConfigError(f"datamodule.channels must be 1 or 3, got {channels!r}")
        self.dataset, self.data_dir = dataset, Path(data_dir)
        self.text_field = text_field or default_text
        self.split_names = {"train": train_split or tr, "val": val_split or va, "test": test_split or te}
        self.layout, self.clips_dir, self.raw_dir, self.csv_name = layout, clips_dir, raw_dir, csv_name
        self.clip_args = dict(
            num_frames=int(num_frames),
            frame_stride=int(frame_stride),
            target_fps=target_fps,
            image_size=_pair(image_size),
            channels=int(channels),
            backend=backend,
            strict=bool(strict),
            cache=bool(cache),
        )
        self.strict = bool(strict)
        self._reports: dict[str, IndexReport] = {}
        h, w = self.clip_args["image_size"]
        self.sample_shape = (int(channels), int(num_frames), h, w)
        # variable-length training clips (difflab.datamodules.buckets); None = one num_frames crop per clip
        self.frame_buckets = resolve_frame_buckets(int(num_frames), buckets, max_frames)
        if bucket_resolutions is not None and self.frame_buckets is None:
            raise ConfigError("datamodule.bucket_resolutions needs datamodule.buckets or datamodule.max_frames")
        self.bucket_resolutions = [_pair(r) for r in (bucket_resolutions or [(h, w)])]
        if bucket_batch not in BATCH_RULES:
            raise ConfigError(f"datamodule.bucket_batch must be one of {BATCH_RULES}, got {bucket_batch!r}")
        self.bucket_batch = bucket_batch
        self._train_buckets: tuple[list[Bucket], dict[Bucket, int]] | None = None
        self.bucket_report: dict[str, Any] | None = None
        self.num_classes, self.class_names = None, None
        if prompts is not None:
            self.prompts = [str(p) for p in prompts]
        else:
            self.prompts = first_distinct([r.text for r in self.index("val").records], int(num_prompts))

    def index(self, name: str) -> IndexReport:
        """The index of split ``name`` ("train" | "val" | "test"), read once."""
        if name not in self._reports:
            split = self.split_names[name]
            if self.dataset == "how2sign":
                rep = read_how2sign_index(
                    self.data_dir,
                    split,
                    layout=self.layout,
                    clips_dir=self.clips_dir,
                    raw_dir=self.raw_dir,
                    csv_name=self.csv_name,
                    strict=self.strict,
                )
            else:
                rep = read_phoenix_index(self.data_dir, split, text_field=self.text_field, strict=self.strict)
            if not rep.records:
                raise DataNotFoundError(
                    f"{rep.annotation_file}: no usable clips ({len(rep.malformed)} malformed "
                    f"rows, {len(rep.missing)} missing files); check datamodule.data_dir and "
                    "the download"
                )
            log.info("%s %s: %s", self.dataset, split, rep.summary())
            self._reports[name] = rep
        return self._reports[name]

    def _build_split(self, name: str) -> Dataset | None:
        return SignVideoDataset(
            self.index(name).records, train=(name == "train"), default_fps=PHOENIX_FPS, **self.clip_args
        )

    # ---- variable-length training clips ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.frame_buckets is not None and stage in (None, "fit"):
            self.train_buckets()  # a bucket no clip fits fails here, before training starts

    def _clip_info_cache(self, split: str) -> Path:
        """Where measured clip lengths are remembered: next to the data, or in the user cache when read-only."""
        if os.access(self.data_dir, os.W_OK):
            return self.data_dir / f".difflab_clip_info_{split}.json"
        import hashlib

        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "difflab" / "clip_info"
        cache.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha1(str(self.data_dir.resolve()).encode()).hexdigest()[:16]
        return cache / f"{key}_{split}.json"

    def train_buckets(self) -> tuple[list[Bucket], dict[Bucket, int]]:
        """The bucket of every training clip and the batch size of every bucket (measured once: container headers,
        remembered in a small JSON file per split); fills `bucket_report` with the fraction of frames used."""
        if self._train_buckets is None:
            ds = self.split_dataset("train")
            split = self.split_names["train"]
            infos = probe_clips(
                ds.records,
                backend=self.clip_args["backend"],
                default_fps=PHOENIX_FPS,
                cache_file=self._clip_info_cache(split),
            )
            lengths = [0 if c is None else usable_frames(c.num_frames, ds._step(c.fps)) for c in infos]
            sizes = [(0, 0) if c is None else (c.height, c.width) for c in infos]
            what = f"{self.dataset} {split} clips"
            buckets = assign_buckets(lengths, self.frame_buckets, self.bucket_resolutions, sizes, what)
            sizes_per_bucket = bucket_batch_sizes(
                buckets, self.batch_size, self.clip_args["num_frames"], self.clip_args["image_size"], self.bucket_batch
            )
            known = [k for k, n in enumerate(lengths) if n > 0]
            self.bucket_report = {
                "clips": len(lengths),
                "unmeasured": len(lengths) - len(known),
                "frames_used_fixed": frame_usage(
                    [lengths[k] for k in known], [self.clip_args["num_frames"]] * len(known)
                ),
                "frames_used_buckets": frame_usage([lengths[k] for k in known], [buckets[k].frames for k in known]),
                "buckets": summarize(buckets, sizes_per_bucket),
            }
            log.info(
                "%s: buckets %s; frames used %.1f%% (fixed %d-frame crops: %.1f%%)",
                what,
                self.bucket_report["buckets"],
                100 * self.bucket_report["frames_used_buckets"],
                self.clip_args["num_frames"],
                100 * self.bucket_report["frames_used_fixed"],
            )
            self._train_buckets = (buckets, sizes_per_bucket)
        return self._train_buckets

    def bucket_sampler(self) -> BucketBatchSampler:
        """The training batch sampler (seed: the run's global seed, else ``datamodule.seed``: the same on every
        rank)."""
        buckets, sizes = self.train_buckets()
        env = os.environ.get("PL_GLOBAL_SEED")
        seed = int(env) if env not in (None, "") else self.seed
        return BucketBatchSampler(None, buckets, sizes, shuffle=True, seed=seed, drop_last=self.drop_last)

    def train_dataloader(self):
        if self.frame_buckets is None:
            return super().train_dataloader()

        dataset = self.split_dataset("train")
        sampler = self.bucket_sampler()
        generator = torch.Generator()
        generator.manual_seed(_mix(sampler.seed, 1))
        workers = self.num_workers
        return ResumableDataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            pin_memory=self.pin_memory and _accelerator_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=collate_buckets,
            generator=generator,
        )

    def data_report(self) -> dict[str, dict[str, int]]:
        """Per built split: clip count, malformed rows skipped, listed files missing, videos found unreadable."""
        out = {}
        for name, rep in self._reports.items():
            ds = self._splits.get(name)
            out[name] = {
                "clips": len(rep.records),
                "malformed_rows": len(rep.malformed),
                "missing_files": len(rep.missing),
                "unreadable_files": ds.num_unreadable if ds is not None else 0,
            }
        return out
