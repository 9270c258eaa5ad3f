"""Streaming shards vs the memory-mapped latent cache: time to first batch, samples/s and peak RSS.

Synthetic latents of shape 4 x 8 x 8, float16 (512 bytes each; int64 labels, no text), 100k and 1M of them (51 MB
and 512 MB), or 10k with --quick. Each size is written once under --dir in both layouts through the library's own
writers, without an autoencoder:

- the memory-mapped cache (``difflab.latents.cache`` format: ``train/latents.npy`` + ``labels.npy`` + manifest),
- litdata shards converted from it by ``difflab.latents.shards.cache_to_shards`` (the shard writer that
  ``encode_latents.py format=shards`` uses; default shard size, about 64 MB = 131,072 latents per shard).

Every measurement is a fresh Python process that builds the datamodule (``LatentDataModule`` or
``StreamingLatentDataModule``, ``datamodule=latents`` / ``datamodule=latents_stream``), then reads one shuffled epoch
(or --max-batches) of its train loader, batch 256:

- open (s): building the datamodule (manifest, for shards also every split's shard index);
- first batch (s): from asking for the loader to holding the first batch (worker start-up, first shard mapped);
- samples/s over the epoch (first batch included);
- peak RSS: VmHWM of the main process and the largest loader worker (``getrusage(RUSAGE_CHILDREN)`` once the
  workers are joined), and private memory (RssAnon) grown in the main process over the epoch. RSS counts the
  mapped file pages a process touched (page cache, shared between workers and ranks, reclaimable);
  private memory does not.

Prints a markdown table and writes bench/results/streaming.md (streaming_quick.md with --quick).

    PYTHONPATH=. python bench/bench_streaming.py [--quick] [--dir /tmp/difflab_stream_bench] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPE = (4, 8, 8)
BYTES = 2 * 4 * 8 * 8


# ---------------------------------------------------------------------------------------------- data
def write_cache(root: Path, n: int, n_val: int = 1000, seed: int = 0) -> Path:
    """A complete memory-mapped latent cache of n random float16 latents (plus n_val for val)."""
    import numpy as np

    from difflab.latents.cache import (
        LABELS,
        LATENTS,
        STATUS_COMPLETE,
        channel_moments,
        new_manifest,
        normalisation,
        read_manifest,
        split_dir,
        write_manifest,
    )

    out = root / f"cache_n{n}"
    old = read_manifest(out) if out.exists() else None
    if old is not None and old.get("status") == STATUS_COMPLETE and old["splits"]["train"]["count"] == n:
        return out
    identity = {"class": "bench.synthetic", "config": {}, "hash": "0" * 64, "spec": None}
    manifest = new_manifest(identity, {"target": "bench.synthetic", "args": {"n": n, "seed": seed}}, "float16", 4096)
    manifest.update(
        latent_shape=list(SHAPE),
        pixel_shape=[3, 64, 64],
        num_classes=10,
        class_names=[f"c{i}" for i in range(10)],
        prompts=None,
    )
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", n_val)):
        d = split_dir(out, split)
        d.mkdir(parents=True, exist_ok=True)
        lat = np.lib.format.open_memmap(d / LATENTS, mode="w+", dtype=np.float16, shape=(count, *SHAPE))
        for i in range(0, count, 65536):
            m = min(65536, count - i)  # channel-dependent mean/std: the normalisation is not the identity
            block = rng.standard_normal((m, *SHAPE), dtype=np.float32) * np.array([1, 2, 3, 4])[:, None, None]
            lat[i : i + m] = block + np.array([0.5, -1, 0, 2])[:, None, None]
        lat.flush()
        del lat
        np.save(d / LABELS, rng.integers(0, 10, size=count).astype(np.int64))
        manifest["splits"][split] = {"count": count, "done": count, "has_label": True, "has_text": False}
        manifest["count"][split] = count
    mean, var, _ = channel_moments(np.load(split_dir(out, "train") / LATENTS, mmap_mode="r"))
    manifest["transform"] = normalisation(mean, var, 0.5)
    manifest["status"] = STATUS_COMPLETE
    write_manifest(out, manifest)
    return out


def write_shards(root: Path, cache: Path, n: int) -> tuple[Path, float | None]:
    """The cache as shards (default shard size); returns the directory and the writing time (None: reused)."""
    from difflab.latents.cache import read_manifest
    from difflab.latents.shards import cache_to_shards

    out = root / f"shards_n{n}"
    old = read_manifest(out) if out.exists() else None
    if old is not None and old.get("status") == "complete":
        return out, None
    t0 = time.perf_counter()
    cache_to_shards(cache, out, overwrite=True)
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- measurement
def status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def measure(fmt: str, path: Path, workers: int, batch_size: int, max_batches: int | None) -> dict:
    """One fresh process: build the datamodule, read one epoch of its train loader."""
    import torch

    torch.set_num_threads(1)
    if fmt == "mmap":
        from difflab.datamodules.latents import LatentDataModule as DM
    else:
        from difflab.datamodules.streaming_latents import StreamingLatentDataModule as DM
    base = status()
    t0 = time.perf_counter()
    dm = DM(str(path), batch_size=batch_size, num_workers=workers, persistent_workers=False, pin_memory=False)
    if hasattr(dm, "setup"):
        dm.setup("fit")
    open_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    loader = dm.train_dataloader()
    n_batches = len(loader) if max_batches is None else min(max_batches, len(loader))
    it = iter(loader)
    first = next(it)
    first_s = time.perf_counter() - t1
    assert first["x"].shape == (batch_size, *SHAPE) and first["x"].dtype == torch.float32
    samples = len(first["x"])
    for _ in range(n_batches - 1):
        samples += len(next(it)["x"])
    elapsed = time.perf_counter() - t1
    end = status()
    del it, loader
    import gc

    gc.collect()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB, joined workers only
    return {
        "format": fmt,
        "n": int(dm.cache.count("train")),
        "workers": workers,
        "batch_size": batch_size,
        "batches": n_batches,
        "samples": samples,
        "open_s": open_s,
        "first_batch_s": first_s,
        "elapsed_s": elapsed,
        "samples_per_s": samples / elapsed,
        "base_rss": base["VmRSS"],
        "peak_main": end["VmHWM"],
        "peak_worker": children if workers else None,
        "anon_growth": end["RssAnon"] - base["RssAnon"],
        "file_rss": end["RssFile"] - base["RssFile"],
    }


def spawn(fmt: str, path: Path, workers: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--measure",
        fmt,
        str(path),
        "--workers",
        str(workers),
        "--batch-size",
        str(args.batch_size),
    ] + (["--max-batches", str(args.max_batches)] if args.max_batches else [])
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"measurement {fmt} {path.name} workers={workers} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], writes: dict, args) -> str:
    from bench.common import machine_description, md_table

    body = []
    for r in rows:
        peak_worker = "-" if r["peak_worker"] is None else f"{r['peak_worker']:.0f}"
        body.append(
            [
                f"{r['n']:,} ({r['n'] * BYTES / 1e6:.0f} MB)",
                "litdata shards" if r["format"] == "shards" else "memory map",
                r["workers"],
                f"{r['open_s']:.3f}",
                f"{r['first_batch_s']:.3f}",
                f"{r['samples_per_s']:,.0f}",
                f"{r['peak_main']:.0f}",
                peak_worker,
                f"{r['anon_growth']:.0f}",
                f"{r['file_rss']:.0f}",
                f"{r['base_rss']:.0f}",
            ]
        )
    head = [
        "train latents (4x8x8 fp16)",
        "layout",
        "workers",
        "open (s)",
        "first batch (s)",
        "samples/s",
        "peak RSS main (MiB)",
        "peak RSS worker (MiB)",
        "+private main (MiB)",
        "+file-backed main (MiB)",
        "RSS after imports (MiB)",
    ]
    ratios = []
    for n in sorted({r["n"] for r in rows}):
        for w in sorted({r["workers"] for r in rows}):
            pair = {r["format"]: r for r in rows if r["n"] == n and r["workers"] == w}
            if len(pair) == 2:
                ratios.append(
                    f"- {n:,} latents, {w} workers: shards read at "
                    f"{pair['shards']['samples_per_s'] / pair['mmap']['samples_per_s']:.2f}x the memory "
                    f"map's samples/s; first batch {pair['shards']['first_batch_s']:.3f} s vs "
                    f"{pair['mmap']['first_batch_s']:.3f} s."
                )
    write_lines = [
        f"- {n:,} latents: shards written in {s:.1f} s ({n / s:,.0f} latents/s) from the cache"
        for n, s in sorted(writes.items())
        if s is not None
    ]
    scope = f"at most {args.max_batches} batches" if args.max_batches else "one shuffled epoch"
    notes = f"""
Each row is a fresh Python process reading {scope} of the train loader (batch {args.batch_size}, shuffled,
drop_last) right after the data was written (page cache warm: these are local-disk numbers, not object storage).
Memory map: `LatentDataModule` (one vectorised read per batch from `latents.npy`). Shards: `StreamingLatentDataModule`
(litdata `StreamingDataset` + `StreamingDataLoader`: one record per latent, shard order and in-shard order shuffled
per epoch). "RSS after imports" is the process before the datamodule is built (litdata is imported only by the
shard rows). Peak RSS counts mapped file pages touched (shared page cache); "+private" is memory the process owns.

{chr(10).join(ratios)}
{chr(10).join(write_lines)}

Machine: {machine_description()}
"""
    return md_table(head, body) + "\n" + notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/difflab_stream_bench"))
    p.add_argument("--quick", action="store_true", help="10k latents, workers 0 (a smoke run)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="train latents per run (default 100k 1M)")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="loader workers (default 0 2)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--measure", nargs=2, metavar=("FORMAT", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        fmt, path = args.measure
        print(json.dumps(measure(fmt, Path(path), (args.workers or [0])[0], args.batch_size, args.max_batches)))
        return
    sizes = args.sizes or ([10_000] if args.quick else [100_000, 1_000_000])
    workers = args.workers or ([0] if args.quick else [0, 2])
    args.dir.mkdir(parents=True, exist_ok=True)
    rows, writes = [], {}
    for n in sizes:
        cache = write_cache(args.dir, n)
        shards, writes[n] = write_shards(args.dir, cache, n)
        for w in workers:
            for fmt, path in (("mmap", cache), ("shards", shards)):
                r = spawn(fmt, path, w, args)
                print(
                    f"n={n:,} {fmt} workers={w}: {r['samples_per_s']:,.0f} samples/s, first batch "
                    f"{r['first_batch_s']:.3f} s, peak RSS {r['peak_main']:.0f} MiB",
                    file=sys.stderr,
                )
                rows.append(r)
    from bench.common import write_result

    title = "# Streaming shards vs memory-mapped latent cache" + (" (quick)" if args.quick else "")
    md = f"{title}\n\nGenerated by `python bench/bench_streaming.py{' --quick' if args.quick else ''}`.\n\n" + table(
        rows, writes, args
    )
    print(md)
    print(f"wrote {write_result('streaming', md, quick=args.quick)}", file=sys.stderr)


if __name__ == "__main__":
    main()
