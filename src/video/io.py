"""Video files in and out: decode a time range (PyAV, or TorchCodec), read PNG frame folders, write mp4/GIF, tile grids.

Frames are uint8 arrays ``T x H x W x C`` (C = 3, or 1 for grey) everywhere in this module. Times are seconds from
the first frame of the video stream, so How2Sign START/END values can be used as they are.
"""

from __future__ import annotations

import fractions
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from difflab.ops.atomic import atomic_path
from difflab.utils.extras import install_hint
from difflab.utils.images import round_to_uint8, to_uint8

BACKENDS = ("pyav", "torchcodec")
FRAME_EXTS = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class VideoInfo:
    """What a reader knows about a video stream before decoding it."""

    fps: float
    num_frames: int
    duration: float
    width: int
    height: int


# ------------------------------------------------------------------------------------------------------------- reading
_local = threading.local()


def _reformatter():
    """One PyAV VideoReformatter per thread and process: reusing its swscale context makes RGB conversion of small
    frames several times faster than ``frame.to_ndarray(format=...)``, which builds a new context for every frame.

    The process id is part of the key because a forked DataLoader worker inherits the parent's object, whose scaler
    worker threads do not exist in the child (using it there deadlocks); conversions also run single-threaded.
    """
    cached = getattr(_local, "reformatter", None)
    if cached is None or cached[0] != os.getpid():
        from av.video.reformatter import VideoReformatter

        cached = _local.reformatter = (os.getpid(), VideoReformatter())
    return cached[1]


class PyAVReader:
    """Reads frames of one file with PyAV (FFmpeg is bundled in the ``av`` wheels). Use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        import av  # imported here so that importing this module stays cheap

        self.path = str(path)
        self._container = av.open(self.path)
        if not self._container.streams.video:
            self._container.close()
            raise ValueError(f"{self.path}: no video stream")
        self._stream = self._container.streams.video[0]
        s = self._stream
        rate = s.average_rate or s.guessed_rate or s.base_rate
        if not rate:
            self._container.close()
            raise ValueError(f"{self.path}: the container does not give a frame rate")
        fps = float(rate)
        tb = s.time_base
        self._start_pts = s.start_time if s.start_time is not None else 0
        if s.duration is not None and tb is not None:
            duration = float(s.duration * tb)
        elif self._container.duration is not None:
            duration = self._container.duration / 1_000_000.0
        else:
            duration = 0.0
        num_frames = int(s.frames) if s.frames else int(round(duration * fps))
        if duration <= 0 and num_frames > 0:
            duration = num_frames / fps
        if num_frames <= 0:
            self._container.close()
            raise ValueError(f"{self.path}: the container reports no frames")
        self.info = VideoInfo(fps, num_frames, duration, s.codec_context.width, s.codec_context.height)

    def frames_in_range(
        self, start: float | None = None, end: float | None = None, size: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Frames whose presentation time lies in ``[start, end)`` and their times (seconds from stream start).

        ``size=(height, width)`` lets FFmpeg's scaler resize while converting to RGB (much cheaper than decoding
        1280x720 frames to RGB and resizing afterwards).
        """
        s, tb = self._stream, self._stream.time_base
        start = 0.0 if start is None else max(0.0, float(start))
        end = float("inf") if end is None else float(end)
        if start > 0:
            # seek lands on the key frame at or before `start`; frames before `start` are decoded and dropped
            self._container.seek(self._start_pts + int(start / tb), stream=s, backward=True, any_frame=False)
        kwargs = {"format": "rgb24", "threads": 1}
        if size is not None:
            kwargs.update(height=int(size[0]), width=int(size[1]), interpolation="AREA")
        reformat = _reformatter().reformat
        frames, times = [], []
        eps = 1e-6
        for k, frame in enumerate(self._container.decode(s)):
            t = (frame.pts - self._start_pts) * tb if frame.pts is not None else k / self.info.fps
            t = float(t)
            if t < start - eps:
                continue
            if t >= end - eps:
                break
            frames.append(reformat(frame, **kwargs).to_ndarray())
            times.append(t)
        if not frames:
            return np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0)
        return np.stack(frames), np.asarray(times, dtype=np.float64)

    def close(self) -> None:
        """Release the file handle and the decoder."""
        self._container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TorchCodecReader:
    """Reads frames of one file with TorchCodec (needs a system FFmpeg); same interface as :class:`PyAVReader`."""

    def __init__(self, path: str | os.PathLike):
        try:
            from torchcodec.decoders import VideoDecoder
        except ImportError as e:  # also a torchcodec that cannot find FFmpeg's shared libraries
            # stays an ImportError: datasets re-raise it instead of skipping every clip as unreadable
            raise ImportError(
                f"backend='torchcodec' needs the torchcodec package and a system FFmpeg ({e}); "
                f"{install_hint('torchcodec')} and install FFmpeg, or use backend='pyav'"
            ) from e
        self.path = str(path)
        self._decoder = VideoDecoder(self.path, dimension_order="NHWC", num_ffmpeg_threads=1)
        m = self._decoder.metadata
        self._begin = float(m.begin_stream_seconds or 0.0)
        self._end = float(m.end_stream_seconds) if m.end_stream_seconds is not None else float("inf")
        duration = float(m.duration_seconds or (self._end - self._begin))
        self.info = VideoInfo(float(m.average_fps), int(m.num_frames), duration, int(m.width), int(m.height))

    def frames_in_range(
        self, start: float | None = None, end: float | None = None, size: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Frames played in ``[start, end)`` (seconds from stream start) and their times; ``size`` resizes (H, W)."""
        a = self._begin + (0.0 if start is None else max(0.0, float(start)))
        b = self._end if end is None else min(self._end, self._begin + float(end))
        if a >= self._end or b <= a:
            return np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0)
        batch = self._decoder.get_frames_played_in_range(a, b)
        data = batch.data  # N x H x W x C uint8
        if size is not None and data.shape[0] > 0:
            data = resize_uint8(data.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1)
        return data.contiguous().numpy(), batch.pts_seconds.double().numpy() - self._begin

    def close(self) -> None:
        """Drop the decoder."""
        self._decoder = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_video(path: str | os.PathLike, backend: str = "pyav"):
    """A reader (``.info``, ``.frames_in_range(start, end, size)``, context manager) for ``backend``."""
    if backend == "pyav":
        return PyAVReader(path)
    if backend == "torchcodec":
        return TorchCodecReader(path)
    raise ValueError(f"unknown video backend {backend!r}; use one of {BACKENDS}")


def probe_video(path: str | os.PathLike, backend: str = "pyav") -> VideoInfo:
    """Frame rate, frame count, duration and size of a video file, read from the container."""
    with open_video(path, backend) as r:
        return r.info


def read_video(
    path: str | os.PathLike,
    start: float | None = None,
    end: float | None = None,
    *,
    backend: str = "pyav",
    as_tensor: bool = False,
) -> np.ndarray | torch.Tensor:
    """Decode the frames shown in ``[start, end)`` seconds (None = from the start / to the end) as ``T x H x W x 3``."""
    with open_video(path, backend) as r:
        frames, _ = r.frames_in_range(start, end)
    return torch.from_numpy(frames) if as_tensor else frames


def list_frame_files(folder: str | os.PathLike) -> list[str]:
    """The image files of a frame folder (PNG/JPEG), sorted by name (``images0001.png`` < ``images0002.png``)."""
    folder = str(folder)
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.lower().endswith(FRAME_EXTS)]


def read_frame_files(
    files: Sequence[str | os.PathLike], *, size: tuple[int, int] | None = None, grey: bool = False
) -> np.ndarray:
    """Read image files as ``T x H x W x C`` uint8; ``size=(height, width)`` resizes with PIL's antialiased
    bilinear filter, ``grey`` gives one channel. Each distinct file is decoded once even if listed twice."""
    from PIL import Image

    decoded: dict[str, np.ndarray] = {}
    out = []
    for f in map(str, files):
        if f not in decoded:
            with Image.open(f) as im:
                im = im.convert("L" if grey else "RGB")
                if size is not None and (im.height, im.width) != tuple(size):
                    im = im.resize((int(size[1]), int(size[0])), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
            decoded[f] = a[..., None] if grey else a
        out.append(decoded[f])
    return np.stack(out)


def read_frame_folder(
    folder: str | os.PathLike,
    indices: Sequence[int] | None = None,
    *,
    size: tuple[int, int] | None = None,
    grey: bool = False,
) -> np.ndarray:
    """Read a folder of frame images (sorted by name) as ``T x H x W x C`` uint8: all frames or those at ``indices``."""
    files = list_frame_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no .png/.jpg frames in this folder")
    return read_frame_files(files if indices is None else [files[i] for i in indices], size=size, grey=grey)


def resize_uint8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``N x C x H x W`` uint8 with antialiased bilinear interpolation, back to uint8 (``round_to_uint8``)."""
    y = torch.nn.functional.interpolate(
        x.float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False
    )
    return round_to_uint8(y)


# ------------------------------------------------------------------------------------------------------------- writing
def _as_uint8_frames(frames, what: str) -> np.ndarray:
    """Check and normalise frames to ``T x H x W x C`` uint8 numpy with C in {1, 3}."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(
            f"{what}: frames must be uint8 T x H x W x C, got {frames.dtype}; "
            "convert model outputs with to_uint8_video(x)"
        )
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.shape[0] == 0:
        raise ValueError(f"{what}: frames must be T x H x W x C with T >= 1 and C in (1, 3), got {frames.shape}")
    return frames


def to_uint8_video(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Model-space video(s) in [-1, 1], ``C x T x H x W`` or ``B x C x T x H x W``, to uint8 ``(B x) T x H x W x C``.

    A layout wrapper around ``difflab.utils.images.to_uint8`` (numpy, channels last), so videos are quantised
    exactly like images.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if x.ndim not in (4, 5):
        raise ValueError(f"to_uint8_video: expected C x T x H x W or B x C x T x H x W, got shape {tuple(x.shape)}")
    y = to_uint8(x).cpu()
    perm = (1, 2, 3, 0) if x.ndim == 4 else (0, 2, 3, 4, 1)
    return y.permute(*perm).contiguous().numpy()


def mp4_encoder() -> str:
    """The mp4 video encoder to use: libx264 (H.264) when the av wheel has it, else mpeg4 (MPEG-4 part 2)."""
    import av

    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # UnknownCodecError and friends differ between PyAV versions
            continue
    raise RuntimeError("this PyAV build has neither a libx264 nor an mpeg4 encoder; reinstall `av` from PyPI")


def write_mp4(
    path: str | os.PathLike, frames, fps: float, *, codec: str | None = None, crf: int = 18, options: dict | None = None
) -> Path:
    """Write uint8 ``T x H x W x C`` frames to an mp4 file (H.264 yuv420p, or mpeg4 when x264 is missing).

    Grey frames are written as RGB. 4:2:0 video needs even sizes, so an odd height/width is padded by repeating the
    last row/column. ``crf`` sets H.264 quality (0 = lossless, 18 = visually lossless); ``options`` go to the encoder.
    Written atomically (``difflab.ops.atomic``): a kill or a full disk (``DiskFullError``) leaves no partial file.
    """
    frames = _as_uint8_frames(frames, str(path))
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    ph, pw = frames.shape[1] % 2, frames.shape[2] % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    import av

    codec = codec or mp4_encoder()
    path = Path(path)
    rate = fractions.Fraction(fps).limit_denominator(1001)
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            opts = {"crf": str(crf), "preset": "veryfast"}
            if frames.shape[1] * frames.shape[2] <= 128 * 128:
                opts["threads"] = "1"  # thread start-up dominates for tiny clips
        else:
            opts = {}
            stream.codec_context.qscale = True  # mpeg4: fixed quantiser 2 (ffmpeg -q:v 2), near-lossless
            stream.codec_context.global_quality = 2 * 118  # 118 = FF_QP2LAMBDA
        opts.update(options or {})
        stream.options = {k: str(v) for k, v in opts.items()}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_gif(path: str | os.PathLike, frames, fps: float, *, loop: int = 0) -> Path:
    """Write uint8 ``T x H x W x C`` frames to an animated GIF with PIL (``loop=0`` repeats forever).

    GIF delays are whole hundredths of a second and browsers slow down delays under 20 ms, so very high frame
    rates play back slower than ``fps``. Written atomically, like `write_mp4`.
    """
    from PIL import Image

    frames = _as_uint8_frames(frames, str(path))
    mode = "L" if frames.shape[-1] == 1 else "RGB"
    images = [Image.fromarray(f[..., 0] if mode == "L" else f, mode) for f in frames]
    path = Path(path)
    duration = max(20, int(round(1000.0 / fps / 10.0)) * 10)
    with atomic_path(path) as tmp:
        images[0].save(
            str(tmp),
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=duration,
            loop=loop,
            optimize=False,
            disposal=1,
        )
    return path


def video_grid(videos, nrow: int, *, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile videos into one video: ``nrow`` videos per grid row (torchvision's ``make_grid`` convention).

    ``videos``: uint8 ``N x T x H x W x C`` (array, tensor or list of ``T x H x W x C``) or a float tensor
    ``N x C x T x H x W`` in [-1, 1]. Order samples prompt-major with ``nrow`` samples per prompt to get one row per
    prompt. Shorter videos hold their last frame. Returns uint8 ``T x H' x W' x C``.
    """
    if isinstance(videos, torch.Tensor) and videos.is_floating_point():
        videos = to_uint8_video(videos)
    vids = [_as_uint8_frames(v, "video_grid") for v in videos]
    if not vids:
        raise ValueError("video_grid: no videos given")
    if nrow < 1:
        raise ValueError(f"video_grid: nrow must be >= 1, got {nrow}")
    h, w, c = vids[0].shape[1:]
    if any(v.shape[1:] != (h, w, c) for v in vids):
        raise ValueError(f"video_grid: all videos need the same H x W x C, got {sorted({v.shape[1:] for v in vids})}")
    t = max(v.shape[0] for v in vids)
    ncol = min(nrow, len(vids))
    nrows = (len(vids) + nrow - 1) // nrow
    grid = np.full((t, nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i, v in enumerate(vids):
        if v.shape[0] < t:
            v = np.concatenate([v, np.repeat(v[-1:], t - v.shape[0], axis=0)])
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = v
    return grid
