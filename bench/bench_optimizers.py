"""Optimizers as an ablation axis: AdamW against Muon (torch's, on the 2-D weights; AdamW on the rest) on the digits
recipe at equal wall-clock, three training seeds each, judged by the repo's digit classifier.

    python bench/bench_optimizers.py [--sweep-dir DIR] [--minutes 3] [--reuse] [--quick]

Runs ``python train.py -m seed=0,1,2 optimizer=adamw,muon callbacks=metrics trainer.max_steps=-1
trainer.max_time=<minutes>`` (the default recipe with the learning-rate schedule laid over the wall-clock budget;
seeds outermost, so the two optimizers alternate and share whatever else the machine does), sample metrics on 500
samples at the end, then ``python ablate.py <sweep> --baseline optimizer=adamw``. Writes
``bench/results/optimizers.md``. ``--reuse`` summarises an existing sweep directory without training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import sweep_and_summarise  # noqa: E402

METRICS = ["metrics/fd_digit500", "metrics/digit_accuracy", "val/loss"]


def sweep_command(sweep_dir: Path, minutes: float, seeds: str) -> list[str]:
    """The user's command line for the sweep."""
    budget = f"00:00:{int(minutes):02d}:{int(round(60 * (minutes % 1))):02d}"
    return [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        f"seed={seeds}",
        "optimizer=adamw,muon",
        "callbacks=metrics",
        "trainer.max_steps=-1",
        f"trainer.max_time={budget}",
        "trainer.val_check_interval=250",
        "callbacks.sample_metrics.every_n_steps=0",
        "callbacks.sample_metrics.n_samples=500",
        "callbacks.class_grid.every_n_steps=0",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "logger=csv",
        f"hydra.sweep.dir={sweep_dir}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-dir", type=Path, default=REPO / "logs" / "bench_optimizers")
    parser.add_argument("--minutes", type=float, default=3.0, help="wall-clock budget of each run")
    parser.add_argument("--reuse", action="store_true", help="summarise --sweep-dir without training")
    parser.add_argument("--quick", action="store_true", help="20 s per run, seeds 0 and 1 (a smoke run)")
    args = parser.parse_args()
    minutes, seeds = (1 / 3, "0,1") if args.quick else (args.minutes, "0,1,2")
    command = sweep_command(args.sweep_dir, minutes, seeds)
    path = sweep_and_summarise(
        "optimizers",
        command,
        args.sweep_dir,
        "optimizer=adamw",
        METRICS,
        reuse=args.reuse,
        quick=args.quick,
        notes=("", "`<sweep>` is the sweep directory you choose, e.g. `logs/bench_optimizers` (the default)."),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
