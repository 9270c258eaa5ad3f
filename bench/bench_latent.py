"""Latent loader benchmark: throughput and memory of LatentDataModule on a synthetic latent cache.

Writes synthetic caches in the real format (``difflab.latents.cache``: float16 N x 4 x 24 x 24 latents, int64 labels,
manifest with normalisation) under --dir, once per size: 10k and 100k latents (~46 MB and ~460 MB), or 10k only
with --quick. Each measurement runs in a fresh subprocess and reads one shuffled epoch (or --max-batches) through
``LatentDataModule.train_dataloader()`` with flip=True:

- batches/s, samples/s, MB/s of latents,
- memory from /proc/<pid>/status of the main process and its loader workers: private RSS (RssAnon) and file-backed
  RSS (RssFile: pages of the memory-mapped cache, shared page cache the kernel can drop) after the epoch, as growth
  over the process just before the datamodule was built.

Prints a markdown table and writes bench/results/latent_loader.md (latent_loader_quick.md with --quick).

    PYTHONPATH=. python bench/bench_latent.py [--quick] [--dir /tmp/difflab_latent_bench] [--workers 0 2]

(The pixel-vs-latent training-speed comparison is a separate part, not in this file.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = (4, 24, 24)


# ---------------------------------------------------------------------------------------------- synthetic cache
def write_synthetic_cache(root: Path, n: int, n_val: int = 1000, seed: int = 0) -> Path:
    """A complete latent cache of n random float16 latents (plus n_val for val) in the real on-disk format."""
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

    out = root / f"n{n}"
    old = read_manifest(out) if out.exists() else None
    if old is not None and old.get("status") == STATUS_COMPLETE and old["splits"]["train"]["count"] == n:
        return out
    identity = {"class": "bench.synthetic", "config": {}, "hash": "0" * 64, "spec": None}
    manifest = new_manifest(identity, {"target": "bench.synthetic", "args": {"n": n, "seed": seed}}, "float16", 4096)
    manifest.update(
        latent_shape=list(SHAPE),
        pixel_shape=[3, 192, 192],
        num_classes=10,
        class_names=[f"c{i}" for i in range(10)],
        prompts=None,
    )
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for split, count in (("train", n), ("val", n_val)):
        d = split_dir(out, split)
        d.mkdir(parents=True, exist_ok=True)
        lat = np.lib.format.open_memmap(d / LATENTS, mode="w+", dtype=np.float16, shape=(count, *SHAPE))
        for i in range(0, count, 4096):
            m = min(4096, count - i)  # channel-dependent mean/std so normalisation is not the identity
            block = rng.standard_normal((m, *SHAPE), dtype=np.float32) * np.array([1, 2, 3, 4])[:, None, None]
            lat[i : i + m] = block + np.array([0.5, -1, 0, 2])[:, None, None]
        lat.flush()
        np.save(d / LABELS, rng.integers(0, 10, size=count).astype(np.int64))
        manifest["splits"][split] = {"count": count, "done": count, "has_label": True, "has_text": False}
        manifest["count"][split] = count
        del lat
    mean, var, _ = channel_moments(np.load(split_dir(out, "train") / LATENTS, mmap_mode="r"))
    manifest["transform"] = normalisation(mean, var, 0.5)
    manifest["status"] = STATUS_COMPLETE
    write_manifest(out, manifest)
    size = (split_dir(out, "train") / LATENTS).stat().st_size
    print(
        f"wrote synthetic cache {out} ({size / 1e6:.0f} MB train latents) in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return out


# ---------------------------------------------------------------------------------------------- measurement
def proc_mem(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def child_pids() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        children = (task / "children").read_text().split()
        pids += [int(p) for p in children]
    return pids


class RandomLatents:
    """Reference dataset: fresh random batches of the same shape, no cache (isolates DataLoader/worker costs)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, idx) -> dict:
        import torch

        return {"x": torch.randn(len(idx), *SHAPE), "label": torch.zeros(len(idx), dtype=torch.int64)}


def run_worker(cache: Path, workers: int, batch_size: int, max_batches: int | None, reference: bool = False) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from difflab.datamodules.latents import LatentDataModule, collate_batches

    torch.manual_seed(0)
    torch.set_num_threads(1)  # loading is memory/IO work; avoid oversubscribing the shared cores
    base = proc_mem()
    dm = LatentDataModule(
        str(cache), batch_size=batch_size, flip=True, num_workers=workers, persistent_workers=workers > 0
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    if reference:
        loader = DataLoader(
            RandomLatents(len(dm.dataset("train"))),
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=collate_batches,
        )
    n_batches = len(loader) if max_batches is None else min(max_batches, len(loader))
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    first_s = time.perf_counter() - t0
    kids0 = {p: proc_mem(p) for p in child_pids()} if workers else {}  # workers are up after the first batch
    assert first["x"].shape == (batch_size, *SHAPE) and first["label"].shape == (batch_size,)
    for _ in range(n_batches - 1):
        next(it)
    elapsed = time.perf_counter() - t0
    end = proc_mem()
    kids = {p: proc_mem(p) for p in kids0}
    del it
    samples = n_batches * batch_size
    return {
        "n": len(dm.dataset("train")),
        "workers": workers,
        "batches": n_batches,
        "batch_size": batch_size,
        "reference": reference,
        "first_batch_s": first_s,
        "elapsed_s": elapsed,
        "batches_per_s": n_batches / elapsed,
        "samples_per_s": samples / elapsed,
        "mb_per_s": samples * 2 * math.prod(SHAPE) / 1e6 / elapsed,
        "rss_base": base["VmRSS"],
        "anon_main": end["RssAnon"] - base["RssAnon"],
        "file_main": end["RssFile"] - base["RssFile"],
        "peak_main": end["VmHWM"] - base["VmRSS"],
        "anon_workers": sum(kids[p]["RssAnon"] - kids0[p]["RssAnon"] for p in kids),
        "file_workers": sum(kids[p]["RssFile"] - kids0[p]["RssFile"] for p in kids),
        "anon_workers_total": sum(k["RssAnon"] for k in kids.values()),
    }


def spawn(cache: Path, workers: int, args, reference: bool = False) -> dict:
    cmd = (
        [
            sys.executable,
            __file__,
            "--worker",
            str(cache),
            "--workers",
            str(workers),
            "--batch-size",
            str(args.batch_size),
        ]
        + (["--max-batches", str(args.max_batches)] if args.max_batches else [])
        + (["--reference"] if reference else [])
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _label(r: dict) -> str:
    if r.get("reference"):
        return f"reference: random tensors, no cache ({r['n']:,} per epoch)"
    return f"{r['n']:,} ({r['n'] * 2 * math.prod(SHAPE) / 1e6:.0f} MB)"


def table(rows: list[dict], args) -> str:
    import torch

    head = (
        "| cache (N x 4x24x24 fp16) | workers | batches | batches/s | samples/s | MB/s | first batch (s) "
        "| +private RSS main (MiB) | +file RSS main (MiB) | +private RSS workers (MiB) | +file RSS workers (MiB) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {_label(r)} | {r['workers']} | {r['batches']} "
        f"| {r['batches_per_s']:.1f} | {r['samples_per_s']:,.0f} | {r['mb_per_s']:.0f} | {r['first_batch_s']:.3f} "
        f"| {r['anon_main']:.0f} | {r['file_main']:.0f} | {r['anon_workers']:.0f} | {r['file_workers']:.0f} |\n"
        for r in rows
    )
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    notes = f"""
One shuffled epoch{"" if not args.max_batches else f" (at most {args.max_batches} batches)"} of
`LatentDataModule(batch_size={args.batch_size}, flip=True).train_dataloader()` per row, each in a fresh process;
page cache warm (caches written just before). Machine: {os.cpu_count()} CPU cores (shared; 1-min load average
{load:.1f} at the end), {mem_gib:.0f} GiB RAM, Python {platform.python_version()}, torch {torch.__version__}.
"+" columns are growth over the process just before the datamodule was built (baseline VmRSS about
{rows[0]["rss_base"]:.0f} MiB after imports); worker columns are growth from the first batch (workers started) to
the end of the epoch, summed over the loader workers (forked workers also show the parent's pages they share, not
counted here).

Private RSS (RssAnon) is what the loader really holds. File-backed RSS (RssFile) counts pages of the
memory-mapped cache touched during the epoch: shared page cache (one copy for all workers and DDP ranks on a node)
that the kernel drops under memory pressure; it grows with the pages read, but is not memory the loader owns.
The "reference" rows run the same DataLoader settings over random tensors (no cache, no file): private growth
in workers that also appears there is torch's worker machinery (allocator, copy-on-write), not the cache.
"""
    return head + body + notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/difflab_latent_bench"))
    p.add_argument("--quick", action="store_true", help="10k latents only, workers 0")
    p.add_argument("--workers", type=int, nargs="+", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        print(json.dumps(run_worker(args.worker, args.workers[0], args.batch_size, args.max_batches, args.reference)))
        return
    sizes = [10_000] if args.quick else [10_000, 100_000]
    workers = args.workers or ([0] if args.quick else [0, 2])
    rows = []
    for n in sizes:
        cache = write_synthetic_cache(args.dir, n)
        for w in workers:
            r = spawn(cache, w, args)
            print(
                f"n={n} workers={w}: {r['samples_per_s']:,.0f} samples/s, +RssAnon {r['anon_main']:.0f} MiB",
                file=sys.stderr,
            )
            rows.append(r)
    for w in workers:  # same loader settings over random tensors: what the DataLoader machinery alone costs
        rows.append(spawn(cache, w, args, reference=True))
    md = table(rows, args)
    print(md)
    out = REPO / "bench" / "results" / ("latent_loader_quick.md" if args.quick else "latent_loader.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Latent loader (LatentDataModule)\n\n" + md)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
