"""Start-up time and memory of STL10 loading: torchvision.datasets.STL10 vs difflab's STL10DataModule.

Writes a synthetic STL10 file set in the official layout and sizes (5000 train, 8000 test, 100000 unlabelled
images, ~2.9 GB) once under --root, then runs each loader in a fresh subprocess, back to back, on
split="train+unlabeled":

- construction time (torchvision: the dataset constructor; difflab: datamodule constructor + setup("fit")),
- time to the first batch and for --batches shuffled batches of 64 (num_workers=0),
- memory from /proc/self/status: RSS after construction, peak RSS (VmHWM), and after iterating the private
  (RssAnon) and file-backed (RssFile, i.e. shared page cache) parts of RSS.

Prints a markdown table and writes it to bench/results/stl10_loader.md (stl10_loader_quick.md with --quick,
which uses 500/800/2000 images; about a minute on an idle 2-core machine, mostly imports in 3 subprocesses).

    PYTHONPATH=. python bench/bench_stl10_loader.py [--root /tmp/difflab_stl10_bench] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_BYTES = 3 * 96 * 96
FULL = {"train": 5000, "test": 8000, "unlabeled": 100000}
QUICK = {"train": 500, "test": 800, "unlabeled": 2000}
CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


# --------------------------------------------------------------------------------------------------------------
# synthetic data


def write_synthetic(root: Path, counts: dict[str, int]) -> dict[str, list]:
    """Write stl10_binary/ with random images and labels (official layout); return {file: [size, md5]}."""
    import numpy as np

    folder = root / "stl10_binary"
    manifest_path = root / "bench_manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("counts") == counts and all(
            (folder / n).is_file() and (folder / n).stat().st_size == s for n, (s, _) in manifest["files"].items()
        ):
            return manifest["files"]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files: dict[str, list] = {}
    t0 = time.perf_counter()
    for split, n in counts.items():
        md5 = hashlib.md5(usedforsecurity=False)
        with open(folder / f"{split}_X.bin", "wb") as f:
            for start in range(0, n, 2000):
                chunk = rng.bytes(min(2000, n - start) * IMAGE_BYTES)
                md5.update(chunk)
                f.write(chunk)
        files[f"{split}_X.bin"] = [n * IMAGE_BYTES, md5.hexdigest()]
        if split != "unlabeled":
            labels = (rng.integers(0, 10, size=n) + 1).astype(np.uint8).tobytes()
            (folder / f"{split}_y.bin").write_bytes(labels)
            files[f"{split}_y.bin"] = [n, hashlib.md5(labels, usedforsecurity=False).hexdigest()]
    (folder / "class_names.txt").write_text("\n".join(CLASSES) + "\n")
    n_train = counts["train"]
    (folder / "fold_indices.txt").write_text(
        "\n".join(" ".join(str(i) for i in range(k, n_train, 10)) for k in range(10)) + "\n"
    )
    manifest_path.write_text(json.dumps({"counts": counts, "files": files}, indent=1))
    print(
        f"wrote synthetic STL10 ({sum(s for s, _ in files.values()) / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s"
    )
    return files


# --------------------------------------------------------------------------------------------------------------
# measurement (runs inside the subprocess)


def proc_status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def run_worker(kind: str, root: Path, batches: int, batch_size: int, reader: str = "pread") -> dict:
    import torch
    import torchvision  # noqa: F401  (both stacks imported in both workers: equal baselines)
    from torch.utils.data import DataLoader

    from difflab.datamodules import stl10  # noqa: F401  (imports lightning)

    torch.manual_seed(0)
    base = proc_status()
    if kind == "torchvision":
        import torchvision
        from torchvision import transforms
        from torchvision.datasets.utils import check_integrity

        class HonestSTL10(torchvision.datasets.STL10):
            """Does the same md5 work as the stock integrity check (synthetic files cannot match), then passes."""

            def _check_integrity(self) -> bool:
                for filename, md5 in self.train_list + self.test_list:
                    check_integrity(os.path.join(self.root, self.base_folder, filename), md5)
                return True

        tf = transforms.Compose(
            [transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
        )
        t0 = time.perf_counter()
        ds = HonestSTL10(str(root), split="train+unlabeled", transform=tf)
        construct = time.perf_counter() - t0
        loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0)
    else:
        manifest = json.loads((root / "bench_manifest.json").read_text())
        # the synthetic files' own sizes and md5s stand in for the official ones: same verification work
        stl10.STL10_FILES = {n: (int(s), m) for n, (s, m) in manifest["files"].items()}
        t0 = time.perf_counter()
        dm = stl10.STL10DataModule(
            root,
            split="train+unlabeled",
            val_split=None,
            verify="md5",
            reader=reader,
            batch_size=batch_size,
            num_workers=0,
            pin_memory=False,
            persistent_workers=False,
        )
        dm.setup("fit")
        construct = time.perf_counter() - t0
        loader = dm.train_dataloader()
    after_construct = proc_status()
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    first_batch = time.perf_counter() - t0
    assert first[0 if kind == "torchvision" else "x"].shape[1:] == (3, 96, 96)
    for _ in range(batches - 1):
        next(it)
    iterate = time.perf_counter() - t0
    end = proc_status()
    return {  # memory in MiB above the same process just before construction (imports done)
        "kind": kind,
        "n": len(loader.dataset),
        "construct_s": construct,
        "first_batch_s": first_batch,
        "iterate_s": iterate,
        "rss_base": base["VmRSS"],
        "rss_construct": after_construct["VmRSS"] - base["VmRSS"],
        "peak": end["VmHWM"] - base["VmRSS"],
        "anon_end": end["RssAnon"] - base["RssAnon"],
        "file_end": end["RssFile"] - base["RssFile"],
    }


# --------------------------------------------------------------------------------------------------------------
# driver


def spawn(kind: str, args: argparse.Namespace, reader: str = "pread") -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--root",
        str(args.root),
        "--batches",
        str(args.batches),
        "--batch-size",
        str(args.batch_size),
        "--reader",
        reader,
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[tuple[str, dict]], args: argparse.Namespace, counts: dict[str, int], total_gb: float) -> str:
    head = (
        "| loader (split=train+unlabeled) | construct (s) | first batch (s) "
        f"| {args.batches} batches (s) | +RSS after construct (MiB) | +peak RSS (MiB) "
        "| +private RSS after iterating (MiB) | +file-backed RSS after iterating (MiB) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {label} | {r['construct_s']:.3f} | {r['first_batch_s']:.3f} | {r['iterate_s']:.2f} | {r['rss_construct']:.0f} "
        f"| {r['peak']:.0f} | {r['anon_end']:.0f} | {r['file_end']:.0f} |\n"
        for label, r in rows
    )
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch
    import torchvision

    notes = f"""
Synthetic STL10 in the official layout and sizes ({counts["train"]} train, {counts["test"]} test,
{counts["unlabeled"]} unlabelled images; {total_gb:.2f} GB), page cache warm (files written just before).
Each row is a fresh Python process (back to back); batch size {args.batch_size}, shuffled, num_workers=0.
Machine: {os.cpu_count()} CPU cores, {mem_gib:.0f} GiB RAM, {platform.python_implementation()} {platform.python_version()},
torch {torch.__version__}, torchvision {torchvision.__version__}. Memory columns are growth ("+") over the same
process just before construction, after importing torch, torchvision and lightning (that baseline is about
{rows[0][1]["rss_base"]:.0f} MiB and identical for both loaders); peak RSS is VmHWM minus that baseline.

- torchvision: the synthetic files cannot match the official md5s, so the baseline subclasses STL10 with a
  `_check_integrity` that runs the same `check_integrity(path, md5)` calls on all five files as the stock
  one and then returns True: its construction time includes the full md5 work it does at every start.
  Transform: RandomHorizontalFlip + ToTensor + Normalize(0.5, 0.5) (same output range as difflab).
- difflab: `STL10DataModule(split="train+unlabeled", verify="md5")` + `setup("fit")`, with the official
  size/md5 table replaced by the synthetic files' own values (same hashing work). Run 1 has no marker and
  md5-checks the files it uses (train_X, train_y, unlabeled_X) then writes `stl10_binary/.difflab_verified.json`;
  later runs only stat the files and read the marker. Images are read per index (default reader "pread": one
  positioned read of 27 KB per image; the last difflab row uses reader="memmap", an `np.memmap` per file).
- "private RSS" (RssAnon) is memory only that process holds; "file-backed RSS" is page cache mapped into the
  process (shared by all workers / DDP ranks on the node, reclaimable). torchvision's private copy is paid again
  by every DDP rank (and by spawn-started workers). With reader="memmap" the file-backed RSS grows far beyond
  the bytes read because recent kernels map a whole large page-cache folio per page fault (same shared cache,
  no extra RAM, but RSS-based monitors count it); the pread reader keeps RSS flat.
"""
    return head + body + notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/difflab_stl10_bench"))
    parser.add_argument("--quick", action="store_true", help="small synthetic set (500/800/2000 images)")
    parser.add_argument("--batches", type=int, default=None, help="batches to iterate (default 50, 20 with --quick)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--difflab-runs", type=int, default=None, help="default 3 (2 with --quick)")
    parser.add_argument("--torchvision-runs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", choices=["torchvision", "difflab"], help=argparse.SUPPRESS)
    parser.add_argument("--reader", choices=["pread", "memmap"], default="pread", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_worker(args.worker, args.root, args.batches, args.batch_size, args.reader)))
        return

    counts = QUICK if args.quick else FULL
    if args.batches is None:
        args.batches = 20 if args.quick else 50
    if args.difflab_runs is None:
        args.difflab_runs = 2 if args.quick else 3
    if args.quick and args.root == parser.get_default("root"):
        args.root = Path(str(args.root) + "_quick")
    files = write_synthetic(args.root, counts)
    total_gb = sum(s for s, _ in files.values()) / 1e9
    marker = args.root / "stl10_binary" / ".difflab_verified.json"
    marker.unlink(missing_ok=True)

    rows: list[tuple[str, dict]] = []
    for i in range(args.difflab_runs):
        label = "difflab, run 1 (md5 verification, writes marker)" if i == 0 else f"difflab, run {i + 1} (marker valid)"
        rows.append((label, spawn("difflab", args)))
        print(label, rows[-1])
    label = f"difflab reader=memmap, run {args.difflab_runs + 1} (marker valid)"
    rows.append((label, spawn("difflab", args, reader="memmap")))
    print(label, rows[-1])
    for i in range(args.torchvision_runs):
        label = f"torchvision STL10, run {i + 1} (md5 every start)"
        rows.append((label, spawn("torchvision", args)))
        print(label, rows[-1])

    text = table(rows, args, counts, total_gb)
    print()
    print(text)
    out = args.out or REPO / "bench" / "results" / ("stl10_loader_quick.md" if args.quick else "stl10_loader.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    title = "# STL10 loader: start-up and memory" + (" (quick, small synthetic set)" if args.quick else "")
    out.write_text(
        f"{title}\n\nGenerated by `python bench/bench_stl10_loader.py{' --quick' if args.quick else ''}`.\n\n{text}"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
