"""A real ablation, run as a user would: the three formulations on digits over three training seeds, then the sweep
summary with 95% confidence intervals and paired differences.

    python bench/bench_ablation.py [--sweep-dir DIR] [--reuse] [--steps 1000] [--quick]

Runs ``python train.py -m process=vp,edm,flow seed=0,1,2 callbacks=metrics ...`` (the digits recipe, a step
budget instead of its wall-clock cap so that every job sees the same number of steps, sample metrics on 200
samples every 250 steps, the scored class grid every 250 steps), then ``python ablate.py <sweep>``. Writes
``bench/results/ablation.md`` (the summary) and copies the curves to ``bench/results/ablation_<metric>.png``.
``--reuse`` summarises an existing sweep directory without training.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import RESULTS, machine_description, write_result  # noqa: E402

METRICS = ["metrics/fd_digit200", "metrics/digit_accuracy", "metrics/grid_agreement", "val/loss"]


def sweep_command(sweep_dir: Path, steps: int, seeds: str) -> list[str]:
    """The user's command line for the sweep."""
    every = max(1, steps // 4)
    return [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        "process=vp,edm,flow",
        f"seed={seeds}",
        "callbacks=metrics",
        f"trainer.max_steps={steps}",
        "trainer.max_time=null",
        f"trainer.val_check_interval={every}",
        f"callbacks.sample_metrics.every_n_steps={every}",
        "callbacks.sample_metrics.n_samples=200",
        f"callbacks.class_grid.every_n_steps={every}",
        f"callbacks.model_checkpoint.every_n_train_steps={2 * every}",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "logger=csv",
        f"hydra.sweep.dir={sweep_dir}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-dir", type=Path, default=Path("/tmp/difflab_bench_ablation"))
    parser.add_argument("--reuse", action="store_true", help="summarise --sweep-dir without training")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="40 steps, seeds 0 and 1 (a smoke run)")
    args = parser.parse_args()
    steps, seeds = (40, "0,1") if args.quick else (args.steps, "0,1,2")
    command = sweep_command(args.sweep_dir, steps, seeds)
    elapsed = None
    if not args.reuse:
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO)
        elapsed = time.perf_counter() - start
    summary = subprocess.run(
        [
            sys.executable,
            str(REPO / "ablate.py"),
            str(args.sweep_dir),
            "--baseline",
            "process=vp",
            "--metrics",
            *METRICS,
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout
    folder = Path(os.environ.get("DIFFLAB_BENCH_RESULTS") or RESULTS)
    pngs = []
    for metric in METRICS:
        name = metric.replace("/", "_") + ".png"
        source = args.sweep_dir / "ablation" / name
        if source.is_file():
            target = folder / ("ablation_" + name.replace(".png", ".quick.png" if args.quick else ".png"))
            shutil.copyfile(source, target)
            pngs.append(target.name)
    # commands a reader can run: the machine-local sweep directory is written as <sweep>
    shown = "python train.py " + " ".join(c if " " not in c else repr(c) for c in command[2:])
    shown = shown.replace(f"hydra.sweep.dir={args.sweep_dir}", "hydra.sweep.dir=<sweep>")
    summary = summary.replace(str(args.sweep_dir), "<sweep>")
    body = [
        f"Machine: {machine_description()}",
        "",
        f"Sweep: `{shown}`" + (f" ({elapsed / 60:.0f} min)" if elapsed else ""),
        f"Summary: `python ablate.py <sweep> --baseline process=vp --metrics {' '.join(METRICS)}`",
        "",
        "Curves: " + ", ".join(f"`bench/results/{p}`" for p in pngs),
        "",
        summary.replace("# Ablation summary", "### Ablation summary", 1)
        .replace("\n## ", "\n#### ")
        .replace("\n### ", "\n##### "),
    ]
    path = write_result("ablation", "\n".join(body) + "\n", quick=args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
