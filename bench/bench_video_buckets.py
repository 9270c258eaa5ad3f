"""Variable-length video buckets on the How2Sign layout: fraction of frames used and step time per bucket.

Builds a synthetic How2Sign sentence-clip folder (``train_rgb_front_clips/raw_videos/*.mp4`` + tab-separated
``how2sign_train.csv``, the layout SignVideoDataModule reads) whose clip durations follow a log-normal with median
5 s and sigma 0.6 (mean ~6 s, 95% below ~13.4 s), cut to [1, 30] s, at 24 fps: an assumption standing in for
How2Sign's sentence clips (1-30 s), not their measured histogram. The data module resamples to 12 fps
(configs/datamodule/how2sign.yaml), so clips have 12-360 usable frames.

Measured:
1. fraction of the clips' usable frames fed to the model: one fixed ``num_frames`` crop per clip (the default) vs
   buckets up to ``max_frames`` (each clip cropped to the largest bucket length <= its length), for several
   ``max_frames``; plus clips and batch size per bucket (batch x frames ~ batch_size x num_frames);
2. reading the clip lengths (container headers; cold, then from the JSON cache);
3. step time per bucket (forward + backward + AdamW) of a tiny UNet3D at each bucket's (frames, batch size),
   median of interleaved repeats, and per clip-frame.

    python bench/bench_video_buckets.py            # 400 clips, 32x32, UNet3D base 16, 5 repeats
    python bench/bench_video_buckets.py --quick    # 48 clips, 16x16, 3 repeats (< 1 min); prints only

Writes bench/results/video_buckets.md (``--quick``: prints only, unless --write-quick).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import interleaved, machine_description, md_table, median, set_threads, write_result  # noqa: E402
from difflab.datamodules.buckets import Bucket  # noqa: E402
from difflab.datamodules.sign_video import SignVideoDataModule  # noqa: E402
from difflab.video.io import write_mp4  # noqa: E402

HEADER = "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART\tEND\tSENTENCE"


def clip_seconds(n: int, seed: int = 0, median_s: float = 5.0, sigma: float = 0.6) -> np.ndarray:
    """Durations of ``n`` sentence clips: log-normal (median ``median_s``), cut to [1, 30] s."""
    rng = np.random.default_rng(seed)
    return np.clip(np.exp(np.log(median_s) + sigma * rng.standard_normal(n)), 1.0, 30.0)


def build_how2sign(root: Path, seconds: np.ndarray, fps: float, size: tuple[int, int]) -> float:
    """Write the How2Sign sentence-clip layout (train: one mp4 per duration; val: 2 short clips); returns seconds."""
    t0 = time.perf_counter()
    h, w = size
    for split, durs in (("train", seconds), ("val", np.array([2.0, 3.0]))):
        clips = root / f"{split}_rgb_front_clips" / "raw_videos"
        clips.mkdir(parents=True)
        rows = [HEADER]
        for i, d in enumerate(durs):
            n = max(1, int(round(d * fps)))
            vid = f"h2s{split}{i:05d}"
            ramp = (np.arange(n, dtype=np.int64) * 7 % 200 + 20).astype(np.uint8)
            frames = np.broadcast_to(ramp[:, None, None, None], (n, h, w, 3)).copy()
            write_mp4(clips / f"{vid}_0-rgb_front.mp4", frames, fps=fps, codec="mpeg4")
            rows.append(
                f"{vid}\t{vid}-rgb_front\t{vid}_0\t{vid}_0-rgb_front\t0.00\t{n / fps:.2f}\t{split} sentence {i}"
            )
        (root / f"how2sign_{split}.csv").write_text("\n".join(rows) + "\n")
    return time.perf_counter() - t0


def datamodule(root: Path, args, max_frames: int | None) -> SignVideoDataModule:
    return SignVideoDataModule(
        dataset="how2sign",
        data_dir=str(root),
        num_frames=args.num_frames,
        image_size=args.image_size,
        target_fps=args.target_fps,
        batch_size=args.batch_size,
        num_workers=0,
        pin_memory=False,
        persistent_workers=False,
        max_frames=max_frames,
    )


def usage_rows(root: Path, args) -> tuple[list[list[str]], dict]:
    rows, details = [], {}
    for most in args.max_frames:
        dm = datamodule(root, args, most)
        buckets, sizes = dm.train_buckets()
        rep = dm.bucket_report
        sampler = dm.bucket_sampler()
        details[most] = (buckets, sizes, rep, len(sampler))
        rows.append(
            [
                f"{args.num_frames}..{most} step {args.num_frames}",
                f"{100 * rep['frames_used_fixed']:.1f}%",
                f"{100 * rep['frames_used_buckets']:.1f}%",
                str(len(sampler)),
                rep["buckets"],
            ]
        )
    return rows, details


def tiny_unet(args):
    from difflab.models.unet3d import UNet3D

    return UNet3D(
        in_channels=3,
        base_channels=args.base_channels,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        temporal_attention_levels=(1,),
        groups=4,
        head_dim=8,
    )


def step_times(sizes: dict[Bucket, int], args) -> list[list[str]]:
    """Median seconds per training step of the tiny UNet3D at every bucket's (frames, batch size)."""
    torch.manual_seed(0)
    net = tiny_unet(args)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batches = {b: torch.randn(bs, 3, b.frames, b.height, b.width) for b, bs in sizes.items()}

    def timer(b: Bucket):
        x = batches[b]
        t = torch.rand(x.shape[0]) * 1000

        def run() -> float:
            t0 = time.perf_counter()
            loss = (net(x, t) - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return time.perf_counter() - t0

        return run

    fns = {b: timer(b) for b in sizes}
    interleaved(fns, args.warmup)  # untimed: per-shape kernel set-up, optimizer state, allocator (seconds each)
    got = interleaved(fns, args.repeats)
    rows = []
    for b in sorted(sizes):
        s = median(got[b])
        rows.append(
            [
                str(b),
                str(sizes[b]),
                str(sizes[b] * b.frames),
                f"{1000 * s:.0f}",
                f"{1000 * s / (sizes[b] * b.frames):.2f}",
            ]
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small run (< 1 min), prints only")
    p.add_argument("--write-quick", action="store_true", help="with --quick: also write video_buckets_quick.md")
    p.add_argument("--clips", type=int, default=400)
    p.add_argument("--fps", type=float, default=24.0, help="source frame rate of the synthetic clips")
    p.add_argument("--target-fps", type=float, default=12.0, help="datamodule.target_fps (how2sign.yaml: 12)")
    p.add_argument("--num-frames", type=int, default=16, help="the fixed crop / smallest bucket")
    p.add_argument("--max-frames", type=int, nargs="+", default=[32, 64, 96, 128])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--step-max-frames", type=int, default=64, help="max_frames of the step-time table")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds over all buckets first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.clips, args.image_size, args.repeats, args.base_channels = 48, 16, 3, 8
        args.max_frames, args.step_max_frames, args.batch_size = [32, 64], 64, 4
    set_threads(args.threads)
    seconds = clip_seconds(args.clips, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "how2sign"
        write_s = build_how2sign(root, seconds, args.fps, (args.image_size, args.image_size))
        t0 = time.perf_counter()
        first = datamodule(root, args, args.step_max_frames)
        first.train_buckets()
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        datamodule(root, args, args.step_max_frames).train_buckets()
        warm = time.perf_counter() - t0
        usage, details = usage_rows(root, args)
        step_sizes = details.get(args.step_max_frames, (None, None))[1] or first.train_buckets()[1]
        steps = step_times(step_sizes, args)
    text = "\n".join(
        [
            "# Variable-length video buckets (How2Sign layout)",
            "",
            machine_description(),
            "",
            f"Synthetic How2Sign train split: {args.clips} sentence clips, durations log-normal (median 5 s, sigma 0.6) "
            f"cut to [1, 30] s (min {seconds.min():.1f} s, median {np.median(seconds):.1f} s, mean {seconds.mean():.1f} s, "
            f"max {seconds.max():.1f} s), written at {args.fps:g} fps {args.image_size}x{args.image_size} "
            f"({write_s:.1f} s to write); read at target_fps={args.target_fps:g}, image_size={args.image_size}, "
            f"batch_size={args.batch_size}.",
            "",
            "## Fraction of usable frames fed to the model (one epoch)",
            "",
            md_table(
                [
                    "buckets (max_frames)",
                    f"fixed {args.num_frames}-frame crop",
                    "buckets",
                    "batches/epoch",
                    "clips x batch size per bucket",
                ],
                usage,
                ["l", "r", "r", "r", "l"],
            ),
            "",
            f"Reading the {args.clips} clip lengths from the containers: {cold:.2f} s cold (includes building the index), "
            f"{warm:.2f} s with the JSON cache.",
            "",
            f"## Step time per bucket: tiny UNet3D (base {args.base_channels}, mults [1, 2]), AdamW, "
            f"{args.threads} threads, median of {args.repeats} after {args.warmup} untimed rounds",
            "",
            md_table(["bucket TxHxW", "batch", "clip-frames / step", "ms / step", "ms / clip-frame"], steps),
            "",
            "Batch size per bucket: max(1, floor(batch_size x num_frames x image_size^2 / (T x H x W))) "
            "(datamodule.bucket_batch=scale).",
        ]
    )
    print(text)
    if not args.quick or args.write_quick:
        print(f"wrote {write_result('video_buckets', text, quick=args.quick)}")


if __name__ == "__main__":
    main()
