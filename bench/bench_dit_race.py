"""Transformers against the UNets at equal wall-clock, trained as a user would (`train.py` recipes).

    python bench/bench_dit_race.py digits [--budget 300] [--n 500]        # model=dit vs model=unet2d_small
    python bench/bench_dit_race.py video  [--budget 600] [--n-per-prompt 8]  # moving_digits_t2v: video_dit vs unet3d

Each arm trains for the same number of seconds (``trainer.max_steps=-1`` + ``trainer.max_time``: the LR warm-up +
cosine runs over the time budget), one after the other with ``--threads`` torch threads, then its EMA weights are
judged with the recipe's own sampler and guidance: digits by the repo's digit classifier (FD in its features to all
1797 real digits, accuracy = agreement with the requested class, ``--n`` balanced samples, the same initial noise
for every arm); moving digits by ``scripts/eval_moving_digits.py``'s judge (digit recognised per frame, direction of
motion per video, ``--n-per-prompt`` videos for each of the recipe's grid prompts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_vs_diffusers import hms  # noqa: E402
from bench.common import QUIET, compose_train, machine_description, md_table, set_threads, write_result  # noqa: E402

ARMS = {
    "digits": {"unet2d_small": ["experiment=digits", "model=unet2d_small"], "dit": ["experiment=digits", "model=dit"]},
    # the recipes' 100 warm-up steps become 5% of the time budget (a time-bounded run needs a fraction)
    "video": {
        "unet3d": ["experiment=moving_digits_t2v", "lr_schedule.warmup=0.05"],
        "video_dit": ["experiment=moving_digits_t2v_dit", "lr_schedule.warmup=0.05"],
    },
}
QUIET_CSV = [*QUIET, "logger=csv"]


def train_arm(overrides: list[str], budget: float, out_dir: Path) -> dict:
    """Train one recipe for ``budget`` seconds; returns its EMA module and run facts."""
    from difflab.callbacks.ema import ema_module
    from difflab.pipeline import train, trainable_parameters

    cfg = compose_train(
        [*overrides, f"++trainer.max_time='{hms(budget)}'", "trainer.max_steps=-1", *QUIET_CSV], output_dir=out_dir
    )
    t0 = time.perf_counter()
    objs = train(cfg)
    module = ema_module(objs["trainer"], objs["model"])
    return {
        "module": module,
        "steps": int(objs["trainer"].global_step),
        "train_s": time.perf_counter() - t0,
        "params_m": trainable_parameters(objs["model"]) / 1e6,
        "precision": str(objs["trainer"].precision),
    }


def judge_digits(module, args) -> dict:
    from difflab.eval.digits_eval import evaluate_module

    return evaluate_module(module, n=args.n, batch_size=250)


def judge_video(module, args) -> dict:
    from difflab.eval.video_eval import digit_geometry, evaluate_videos, sample_prompts

    digit_size, canvas = digit_geometry(module.run_config)
    samples, raw = sample_prompts(module, list(module.diffusion.prompts), args.n_per_prompt, None, None, 0, 64)
    result = evaluate_videos(samples, raw, digit_size, canvas)
    return result["overall"]


def render(task: str, results: dict, args) -> str:
    if task == "digits":
        header = ["model", "params", "precision", "optimizer steps", "FD", "accuracy"]
        rows = [
            [
                arm,
                f"{r['params_m']:.2f}M",
                r["precision"],
                f"{r['steps']} ({r['steps'] / r['train_s']:.1f}/s)",
                f"{r['eval']['fd']:.2f}",
                f"{r['eval']['accuracy']:.3f}",
            ]
            for arm, r in results.items()
        ]
        how = (
            f"`python bench/bench_dit_race.py digits --budget {args.budget:g} --n {args.n}`: `experiment=digits` "
            f"with `model=unet2d_small` (the recipe's) and `model=dit` (DiT-T/4), {args.budget:g} s of training "
            f"each; the recipe's sampler (Heun, 10 steps) and guidance (2); {args.n} balanced samples, the same "
            f"initial noise; FD in the digit classifier's features to the 1797 real digits (real-vs-real floor "
            f"at n = 500: 3.14, BENCHMARKS.md), accuracy by the same classifier."
        )
    else:
        header = [
            "model",
            "params",
            "precision",
            "optimizer steps",
            "prompts passed",
            "digit (frames)",
            "direction (videos)",
        ]
        rows = [
            [
                arm,
                f"{r['params_m']:.2f}M",
                r["precision"],
                f"{r['steps']} ({r['steps'] / r['train_s']:.2f}/s)",
                f"{r['eval']['prompts_passed']}/{r['eval']['prompts']}",
                f"{r['eval']['digit_frame_acc']:.2f}",
                f"{r['eval']['direction_acc']:.2f}",
            ]
            for arm, r in results.items()
        ]
        how = (
            f"`python bench/bench_dit_race.py video --budget {args.budget:g} --n-per-prompt {args.n_per_prompt}`: "
            f"`experiment=moving_digits_t2v` (UNet3D) and `experiment=moving_digits_t2v_dit` (VideoDiT-T/4, "
            f"factorised attention), identical apart from the denoiser and its learning rate, {args.budget:g} s of "
            f"training each; DDIM 50 steps, guidance 3 (the recipes'); {args.n_per_prompt} videos for each of the "
            f"recipe's grid prompts, judged by scripts/eval_moving_digits.py (a prompt passes when the digit is "
            f"right in > 50% of frames and the direction in > 50% of videos)."
        )
    return "\n".join(
        [
            f"# Transformers vs UNets at equal wall-clock: {task}" + (" (quick)" if args.quick else ""),
            "",
            how,
            "",
            md_table(header, rows),
            "",
            f"Machine: {machine_description()}",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=sorted(ARMS))
    p.add_argument("--budget", type=float, default=None, help="training seconds per arm (digits 300, video 600)")
    p.add_argument("--n", type=int, default=500, help="digits: samples per arm")
    p.add_argument("--n-per-prompt", type=int, default=8, help="video: videos per prompt")
    p.add_argument("--arms", nargs="+", default=None, help="run only these arms (merge with an earlier run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a smoke run: 20 s per arm, few samples")
    args = p.parse_args()
    if args.quick:
        args.budget, args.n, args.n_per_prompt = args.budget or 20.0, 50, 2
    args.budget = args.budget or (300.0 if args.task == "digits" else 600.0)
    set_threads(args.threads)
    out_root = Path(f"/tmp/difflab_bench_dit_{args.task}{'_quick' if args.quick else ''}")
    saved = out_root / "results.json"
    results = json.loads(saved.read_text()) if args.arms and saved.is_file() else {}
    judge = judge_digits if args.task == "digits" else judge_video
    for arm, overrides in ARMS[args.task].items():
        if args.arms and arm not in args.arms:
            continue
        run = train_arm(overrides, args.budget, out_root / arm)
        module = run.pop("module")
        run["eval"] = judge(module, args)
        results[arm] = run
        print(arm, json.dumps(run), flush=True)
        out_root.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(results, indent=1))
    results = {arm: results[arm] for arm in ARMS[args.task] if arm in results}
    print(write_result(f"dit_race_{args.task}", render(args.task, results, args), args.quick), flush=True)


if __name__ == "__main__":
    main()
