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
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import sweep_and_summarise  # noqa: E402

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
    path = sweep_and_summarise(
        "ablation", command, args.sweep_dir, "process=vp", METRICS, reuse=args.reuse, quick=args.quick, notes=()
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
