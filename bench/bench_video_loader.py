"""Clip-loading throughput of SignVideoDataModule (clips/s) for 0, 1 and 2 DataLoader workers.

Builds a synthetic How2Sign-layout dataset (sentence-clip mp4 files + how2sign_{train,val}.csv) of moving noisy
blobs, then times full passes over the training loader (random windows, decode + resize + crop).

    python bench/bench_video_loader.py            # 64 clips, 256x256, 24 frames -> 16 x 64x64, 2 epochs
    python bench/bench_video_loader.py --quick    # < 1 min
    python bench/bench_video_loader.py --source-size 720x1280 --clips 32   # How2Sign-sized frames

Writes a markdown table to stdout and to bench/results/video_loader.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difflab.datamodules.sign_video import SignVideoDataModule  # noqa: E402
from difflab.video.io import mp4_encoder, write_mp4  # noqa: E402

HEADER = "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART\tEND\tSENTENCE"


def synthetic_clip(rng: np.random.Generator, t: int, h: int, w: int) -> np.ndarray:
    """uint8 T x H x W x 3: a textured background with a coloured blob moving across, plus grain (so it compresses
    roughly like camera video rather than like flat colour)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.sin(xx / (7 + rng.random() * 5)) * 40 + np.cos(yy / (9 + rng.random() * 5)) * 40 + 110
    frames = np.repeat(base[None, :, :, None], t, 0).repeat(3, -1)
    r = max(2, int(0.15 * min(h, w)))
    g = np.arange(-r, r + 1, dtype=np.float32)
    blob = np.exp(-(g[:, None] ** 2 + g[None, :] ** 2) / (2 * (r / 2) ** 2))[..., None]
    colour = rng.integers(60, 255, 3).astype(np.float32)
    start = rng.random(2) * [h - 2 * r - 1, w - 2 * r - 1]
    end = rng.random(2) * [h - 2 * r - 1, w - 2 * r - 1]
    for k in range(t):
        y, x = (start + (end - start) * k / max(1, t - 1)).astype(int)
        patch = frames[k, y : y + 2 * r + 1, x : x + 2 * r + 1]
        patch[:] = patch * (1 - blob) + colour * blob
    frames += rng.integers(-6, 7, (t, h, w, 1)).astype(np.float32)
    return np.clip(frames, 0, 255).astype(np.uint8)


def build_dataset(root: Path, clips: int, frames: int, size: tuple[int, int], fps: float, seed: int = 0) -> float:
    """Write the How2Sign-layout dataset; returns the seconds it took."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    for split, n in (("train", clips), ("val", 2)):
        rows = [HEADER]
        for i in range(n):
            vid = f"bench{split}{i:04d}"
            name = f"{vid}_0-rgb_front"
            write_mp4(
                root / f"{split}_rgb_front_clips" / "raw_videos" / f"{name}.mp4",
                synthetic_clip(rng, frames, *size),
                fps,
            )
            rows.append(f"{vid}\t{vid}-rgb_front\t{vid}_0\t{name}\t0.0\t{frames / fps:.2f}\tclip number {i}")
        (root / f"how2sign_{split}.csv").write_text("\n".join(rows) + "\n")
    return time.perf_counter() - t0


def time_loader(root: Path, workers: int, epochs: int, args) -> tuple[float, int]:
    """Seconds for ``epochs`` passes over the train loader (persistent workers; start-up included) and clip count."""
    dm = SignVideoDataModule(
        dataset="how2sign",
        data_dir=str(root),
        num_frames=args.num_frames,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=workers,
        pin_memory=False,
        persistent_workers=workers > 0,
        backend=args.backend,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    n = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            n += batch["x"].shape[0]
    elapsed = time.perf_counter() - t0
    assert dm.data_report()["train"]["unreadable_files"] == 0
    return elapsed, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small run (< 1 min)")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--source-frames", type=int, default=24, help="frames per source clip")
    p.add_argument("--source-size", default="256x256", help="HxW of the source clips")
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--backend", default="pyav")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "video_loader.md"))
    args = p.parse_args()
    if args.quick:
        args.clips, args.epochs = min(args.clips, 32), 1
    size = tuple(int(v) for v in args.source_size.lower().split("x"))
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench_video_") as tmp:
        root = Path(tmp)
        build_s = build_dataset(root, args.clips, args.source_frames, size, args.fps)
        rows = []
        for w in workers:
            elapsed, n = time_loader(root, w, args.epochs, args)
            rows.append((w, n, elapsed, n / elapsed))
            print(f"workers={w}: {n} clips in {elapsed:.2f} s", file=sys.stderr)

    import av
    import torch

    lines = [
        "# Video clip loader throughput",
        "",
        f"SignVideoDataModule(dataset=how2sign), {args.clips} synthetic mp4 clips ({mp4_encoder()}) of "
        f"{args.source_frames} frames {size[0]}x{size[1]} at {args.fps:g} fps -> random {args.num_frames}-frame "
        f"windows at {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.epochs} epoch(s), "
        f"backend {args.backend}. Worker start-up is included (persistent workers).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible (1-min load "
        f"average {os.getloadavg()[0]:.1f} at the end: other jobs share these cores), torch {torch.__version__}, "
        f"av {av.__version__}. Writing the dataset took {build_s:.1f} s.",
        "",
        "| num_workers | clips | seconds | clips/s | ms/clip |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {w} | {n} | {s:.2f} | {r:.1f} | {1000 / r:.1f} |" for w, n, s, r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
