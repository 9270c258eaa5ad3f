"""How long should the default recipe's EMA be? A measured sweep over the EMA's length, from post-hoc EMA snapshots of
the race's default-recipe runs, against the recipe's constant-decay EMA.

A constant decay fixes the EMA's length in steps (0.998: ~500), so on a slower machine the same time budget's shorter
run averages over relatively more of its early, worse weights. A power-function EMA (EDM2, `callbacks.ema.sigma_rel`)
keeps its length a fixed fraction of the run. Which fraction is measured here, with no extra training: the race's
difflab side is trained with post-hoc EMA snapshots (run first when ``--race`` holds no runs yet)

    PYTHONPATH=. python bench/bench_vs_diffusers.py train --sides difflab --out /tmp/difflab_ema_race \
        --override callbacks=posthoc --override callbacks.posthoc_ema.snapshot_every=50

then, for each seed, ``reconstruct_ema.py -m`` rebuilds the EMA at each length and ``sample.py -m`` samples every
length and the run's own constant-decay EMA (``last.ckpt``, the baseline) as a user would (``judge=digits``: every
digits judge), summarised by ``ablate.py``. The choice is the race's rule (``bench_vs_diffusers.rule_score``: the
classifier-FD plus pixel-FD ratio to the flow loop of ``--peer-race``, among arms with accuracy >= 0.99), fixed
before the sweep ran; judge 2 is reported, never used to choose.

    PYTHONPATH=. python bench/bench_ema_length.py [--race DIR] [--peer-race DIR] [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_guide_sweep import METRICS, choose_by_rule  # noqa: E402
from bench.bench_vs_diffusers import MIN_ACCURACY, flow_loop_means  # noqa: E402
from bench.common import REPO, sweep_and_summarise  # noqa: E402

SIGMA_RELS = (0.03, 0.05, 0.08, 0.12, 0.17, 0.22)  # within what the tracked 0.05 / 0.10 profiles reconstruct
BASELINE = "constant.ckpt"  # the run's own EMA (callbacks.ema.decay, the recipe before)


def train_runs(race: Path, seeds: list[int], quick: bool) -> None:
    """The race's difflab side with post-hoc EMA snapshots, for the seeds that have no run yet."""
    every = 10 if quick else 50
    command = [sys.executable, str(REPO / "bench" / "bench_vs_diffusers.py"), "train", "--sides", "difflab"]
    command += ["--seeds", ",".join(map(str, seeds)), "--out", str(race), "--override", "callbacks=posthoc"]
    command += ["--override", f"callbacks.posthoc_ema.snapshot_every={every}"] + (["--quick"] if quick else [])
    subprocess.run(command, check=True, cwd=REPO)  # skips the seeds already trained


def reconstruct(race: Path, out: Path, seeds: list[int], sigma_rels, reuse: bool) -> None:
    """<out>/s<seed>/sr<X>.ckpt: the run's EMA of relative length X; constant.ckpt -> the run's last.ckpt."""
    for seed in seeds:
        run = race / f"difflab_s{seed}" / "run"
        d = out / f"s{seed}"
        d.mkdir(parents=True, exist_ok=True)
        (d / BASELINE).unlink(missing_ok=True)
        (d / BASELINE).symlink_to(run / "checkpoints" / "last.ckpt")
        missing = [s for s in sigma_rels if not (d / f"sr{s}.ckpt").is_file()]
        if reuse or not missing:
            continue
        command = [sys.executable, str(REPO / "reconstruct_ema.py"), "-m", f"run_dir={run}"]
        command += ["sigma_rel=" + ",".join(map(str, missing)), f"out={d}/sr${{sigma_rel}}.ckpt"]
        command += [f"hydra.sweep.dir={d}/reconstruct_logs"]
        subprocess.run(command, check=True, cwd=REPO)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--race", type=Path, default=None, help="runs with post-hoc snapshots (/tmp/difflab_ema_race[_quick])"
    )
    p.add_argument(
        "--peer-race", type=Path, default=None, help="the race with the flow loop (/tmp/difflab_race[_quick])"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="reconstructions and the sweep (/tmp/difflab_ema_sweep[_quick])"
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--reuse", action="store_true", help="summarise the existing sweep without sampling again")
    p.add_argument("--quick", action="store_true", help="one seed, 100 samples, two lengths")
    args = p.parse_args()
    suffix = "_quick" if args.quick else ""
    args.race = args.race or Path("/tmp/difflab_ema_race" + suffix)
    args.out = args.out or Path("/tmp/difflab_ema_sweep" + suffix)
    args.peer_race = args.peer_race or Path("/tmp/difflab_race" + suffix)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    sigma_rels = SIGMA_RELS[1:3] if args.quick else SIGMA_RELS
    n = 100 if args.quick else args.n
    if not args.reuse:
        train_runs(args.race, seeds, args.quick)
    reconstruct(args.race, args.out, seeds, sigma_rels, args.reuse)
    files = [BASELINE, *(f"sr{s}.ckpt" for s in sigma_rels)]
    sweep_dir = args.out / "sweep"
    command = [sys.executable, str(REPO / "sample.py"), "-m", f"hydra.sweep.dir={sweep_dir}"]
    command += [f"seed={','.join(map(str, seeds))}", f"n={n}", "judge=digits"]
    command += ["ckpt_path=" + ",".join(f"{args.out}/s${{seed}}/{f}" for f in files)]
    note = (
        "EMA length: the run's constant-decay EMA (`constant.ckpt`, callbacks.ema.decay; the baseline) against "
        "power-function EMAs of relative length sigma_rel reconstructed from post-hoc snapshots of the same run "
        "(`sr<sigma_rel>.ckpt`). Rule for the choice (fixed before the sweep ran): the lowest classifier-FD plus "
        f"pixel-FD ratio to the race's flow loop (`bench_vs_diffusers.rule_score`) among arms with `eval/accuracy` >= "
        f"{MIN_ACCURACY}; judge 2 is reported, never used to choose."
    )
    baseline = f"ckpt_path={args.out}/s$\\{{seed\\}}/{BASELINE}"
    name = "ema_length_sweep"
    written = sweep_and_summarise(
        name, command, sweep_dir, baseline, METRICS, reuse=args.reuse, quick=args.quick, notes=[note]
    )
    choice = choose_by_rule([sweep_dir / "ablation" / "summary.csv"], flow_loop_means(args.peer_race))
    text = written.read_text() + "\n" + choice + "\n"
    written.write_text(text.replace(str(args.out), "<out>"))
    print(choice)
    print("wrote", written)


if __name__ == "__main__":
    main()
