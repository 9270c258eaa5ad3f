"""Cost of a training step per method (the ``method`` group) against the teacher's own diffusion step, back to back.

Each method trains the digits recipe's network inside Lightning as its experiment configures it
(``experiment=digits`` for diffusion training, the teacher's step; ``digits_progressive``, ``digits_reflow``,
``digits_consistency``, ``digits_scm`` with a teacher checkpoint; ``digits_meanflow`` from scratch), without
validation, checkpoints or the progress bar. Time per optimizer step is measured between ``on_train_batch_end`` hooks
after ``--skip`` warm-up steps (reflow's first batch reads its couplings from ``--pairs-dir``, drawn beforehand by
``bench_few_step.py``; the others load their teacher before the first step). The methods alternate their order over
``--repeats`` rounds; medians. The JVP methods (sCM, MeanFlow) pay one forward-mode pass through the network per step.

    PYTHONPATH=. python bench/bench_method_cost.py --teacher <race dir>/difflab_s0/run/checkpoints/last.ckpt \\
        --pairs-dir <few-step out>/pairs [--steps 30] [--skip 10] [--repeats 2] [--threads 2]
        [--only diffusion meanflow] [--name method_cost]

``--only``: the methods whose names start with one of these words (the teacher's step is always timed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_overhead import StepClock, per_step  # noqa: E402
from bench.common import (
    QUIET,
    STEPS_ONLY,
    compose_train,
    interleaved,
    machine_description,
    md_table,
    median,
    set_threads,
    write_result,
)  # noqa: E402

QUIET_STEPS = [*QUIET, *STEPS_ONLY, "logger=csv"]


def round_length(steps: int) -> int:
    """Optimizer steps per progressive round so that the experiment's every round fits in ``steps``."""
    from omegaconf import OmegaConf

    from difflab.configs import CONFIG_DIR
    from difflab.methods.rounds import round_count

    method = OmegaConf.load(CONFIG_DIR / "experiment" / "digits_progressive.yaml").method
    rounds = round_count(method.teacher_steps, method.student_steps)
    return max(1, steps // rounds)


def method_overrides(args) -> dict[str, list[str]]:
    """Each method's experiment and what it needs (a teacher, its couplings, a round length that fits the run)."""
    teacher = f"method.teacher_ckpt={args.teacher}"
    return {
        "diffusion (the teacher's step)": ["experiment=digits"],
        "progressive": ["experiment=digits_progressive", teacher, f"method.steps_per_round={round_length(args.steps)}"],
        "reflow": ["experiment=digits_reflow", teacher, f"method.pairs_dir={args.pairs_dir}"],
        "consistency (ECT gaps)": ["experiment=digits_consistency", teacher],
        "scm (JVP)": ["experiment=digits_scm", teacher],
        "meanflow (JVP), CFG in its targets": ["experiment=digits_meanflow", "method.target_guidance=${guidance}"],
        "meanflow (JVP), plain targets": ["experiment=digits_meanflow", "method.target_guidance=null"],
    }


def seconds_per_step(overrides: list[str], args) -> dict[str, float]:
    from difflab.pipeline import build

    with tempfile.TemporaryDirectory() as out:
        cfg = compose_train([*overrides, *QUIET_STEPS, f"trainer.max_steps={args.steps}"], out)
        objs = build(cfg)
        clock = StepClock()
        objs["trainer"].callbacks.append(clock)
        objs["trainer"].fit(objs["model"], datamodule=objs["datamodule"])
    return per_step(clock.ends, args.skip)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--teacher", type=Path, required=True, help="a default-recipe checkpoint (the distillations' teacher)"
    )
    p.add_argument("--pairs-dir", type=Path, required=True, help="where reflow's couplings of that teacher are")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="time only the methods whose names start with these")
    p.add_argument("--name", default="method_cost", help="the result file's name")
    args = p.parse_args()
    set_threads(args.threads)
    chosen = {
        name: o
        for name, o in method_overrides(args).items()
        if args.only is None or name.startswith("diffusion") or any(name.startswith(w) for w in args.only)
    }
    runs = {name: (lambda o=o: seconds_per_step(o, args)) for name, o in chosen.items()}
    times = interleaved(runs, args.repeats)
    base = median([t["wall"] for t in times["diffusion (the teacher's step)"]])
    base_cpu = median([t["cpu"] for t in times["diffusion (the teacher's step)"]])
    rows = []
    for name, values in times.items():
        wall, cpu = median([t["wall"] for t in values]), median([t["cpu"] for t in values])
        rows.append([name, f"{wall:.3f}", f"{wall / base:.2f}x", f"{cpu:.3f}", f"{cpu / base_cpu:.2f}x"])
    header = ["method", "wall s / step", "vs the teacher's step", "CPU s / step", "CPU vs teacher"]
    text = (
        "# Training cost per step of each few-step method against the teacher's diffusion step\n\n"
        f"`PYTHONPATH=. python bench/bench_method_cost.py --steps {args.steps} --skip {args.skip} --repeats "
        f"{args.repeats}{' --only ' + ' '.join(args.only) if args.only else ''}`: the digits recipe's network (UNet2D 16-32-64, batch 128) inside Lightning, each method as "
        f"its experiment configures it, timed from step {args.skip} to {args.steps}; the methods alternate over "
        f"{args.repeats} rounds, medians.\n\n" + md_table(header, rows) + f"\n\nMachine: {machine_description()}\n"
    )
    print(f"wrote {write_result(args.name, text)}")


if __name__ == "__main__":
    main()
