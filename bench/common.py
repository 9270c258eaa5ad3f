"""Shared benchmark helpers: machine description, timing (interleaved repeats, medians), markdown tables, result files.

Every bench script measures both sides of a comparison in the same process or on the same cores, back to back and
alternating, and reports medians, because the 2-core development machine is shared and timings are noisy.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# Overrides for a training run inside a benchmark: no progress bar or model summary in the log
QUIET = ["~callbacks.progress_bar", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# ... and for a run that times steps only: no checkpoints, no validation, no wall-clock cap
STEPS_ONLY = ["~callbacks.model_checkpoint", "trainer.limit_val_batches=0", "++trainer.max_time=null"]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def shown_path(path: str | Path) -> str:
    """A path as a reader can use it: relative to the repository when inside it, else ``<parent>/<name>`` (a
    directory the reader chooses, named as the bench's docstring explains)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return f"<{path.parent.name}>/{path.name}"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX-BF16), i.e. bf16 matmuls can beat fp32."""
    from difflab.ops.precision import cpu_has_native_bf16

    return cpu_has_native_bf16()


def load_average() -> str:
    """The 1-minute load average (other jobs on a shared machine show up here)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def machine_description() -> str:
    """One paragraph describing where the numbers were measured."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    bf16 = "native bf16 (avx512_bf16/amx)" if has_native_bf16() else "no native bf16 (no avx512_bf16 / amx flags)"
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs visible, {bf16}, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}; 1-min load average "
        f"{load_average()} when written (the machine is shared, so absolute timings are noisy; ratios are "
        f"measured back to back)."
    )


def set_threads(n: int | None) -> None:
    """Pin torch intra-op threads (benchmarks only: steadier timings on a shared machine)."""
    if n:
        torch.set_num_threads(n)


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work so that wall-clock timings are honest (no-op on CPU)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], n: int, warmup: int = 0, device=None) -> float:
    """Seconds per call of fn, averaged over n calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def interleaved(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each timing function once per round, alternating the order every round; all values per name."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            out[k].append(fns[k]())
    return out


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(xs))


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; align entries are 'l' or 'r' (default: first column left, others right)."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    lines = [
        "| " + " | ".join(map(str, header)) + " |",
        "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def write_result(name: str, text: str, quick: bool = False) -> Path:
    """Write bench/results/<name>.md (<name>_quick.md for --quick runs, so a smoke run never hides a real one).

    ``DIFFLAB_BENCH_RESULTS`` redirects the folder (the smoke test writes into a temporary one).
    """
    folder = Path(os.environ.get("DIFFLAB_BENCH_RESULTS") or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"{name}_quick.md" if quick else f"{name}.md")
    path.write_text(text.rstrip() + "\n")
    return path


def git_revision() -> str:
    """Short git revision of the repo (or 'unknown'), recorded next to the numbers."""
    try:
        return (
            subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def compose_train(overrides: Sequence[str] = (), output_dir: str | Path = "/tmp/difflab_bench_run"):
    """The training config (``configs/train.yaml``) composed by Hydra as train.py would, plus overrides."""
    from difflab.utils.compose import compose_train as compose

    return compose(output_dir, [f"paths.root_dir={REPO}", *overrides])


def sweep_and_summarise(
    name: str,
    command: list[str],
    sweep_dir: Path,
    baseline: str,
    metrics: list[str],
    reuse: bool = False,
    quick: bool = False,
    notes: Sequence[str] = (),
) -> Path:
    """Run a ``train.py -m`` (or ``sample.py -m``) sweep as a user would (unless ``reuse``), summarise it with ``ablate.py``, copy its
    curves next to the result file and write ``bench/results/<name>.md`` with commands a reader can run (the sweep
    directory shown as ``<sweep>``)."""
    elapsed = None
    if not reuse:
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO)
        elapsed = time.perf_counter() - start
    ablate = [sys.executable, str(REPO / "ablate.py"), str(sweep_dir), "--baseline", baseline, "--metrics", *metrics]
    summary = subprocess.run(ablate, check=True, capture_output=True, text=True, cwd=REPO).stdout
    folder = Path(os.environ.get("DIFFLAB_BENCH_RESULTS") or RESULTS)
    pngs = []
    for metric in metrics:
        png = metric.replace("/", "_") + ".png"
        source = sweep_dir / "ablation" / png
        if source.is_file():
            target = folder / (f"{name}_" + png.replace(".png", ".quick.png" if quick else ".png"))
            shutil.copyfile(source, target)
            pngs.append(target.name)
    shown = f"python {Path(command[1]).name} " + " ".join(c if " " not in c else repr(c) for c in command[2:])
    shown = shown.replace(f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.dir=<sweep>")
    summary = summary.replace(str(sweep_dir), "<sweep>")
    body = [
        f"Machine: {machine_description()}",
        "",
        f"Sweep: `{shown}`" + (f" ({elapsed / 60:.0f} min)" if elapsed else ""),
        f"Summary: `python ablate.py <sweep> --baseline {baseline} --metrics {' '.join(metrics)}`",
        *notes,
        "",
        "Curves: " + ", ".join(f"`bench/results/{p}`" for p in pngs),
        "",
        summary.replace("# Ablation summary", "### Ablation summary", 1)
        .replace("\n## ", "\n#### ")
        .replace("\n### ", "\n##### "),
    ]
    return write_result(name, "\n".join(body) + "\n", quick=quick)
