"""Few-step generation on digits: progressive distillation (``experiment=digits_progressive``) of default-recipe
teachers, judged at 1, 2, 4 and 8 DDIM steps against the teacher at the same steps and at its own 19-NFE sampler.

Phases:
- ``train``: for each seed, ``python train.py experiment=digits_progressive method.teacher_ckpt=<teacher of that
  seed> seed=<seed>`` through ``difflab.pipeline.train``; the run directory is ``<out>/pd_s<seed>``, with the
  training wall-clock and step count in ``meta.json`` (the cost per step against the teacher's own training step is
  read from the teacher's race ``meta.json`` when there is one).
- ``judge``: each seed's teacher and its students (the checkpoint at the end of each round: 8, 4, 2, 1 steps) draw
  ``--n`` balanced samples (labels i % 10, noise seeded by the seed), and every judge of
  ``difflab.eval.digits_eval.evaluate_samples`` scores them; means with 95% t-intervals over the seeds; real digits
  give the floors. The teacher at few steps samples with DDIM on the student's grid (flow's grid evenly to 0, the
  recipe's grid shift) with its own guidance; students sample unguided, as they were trained. Writes
  ``bench/results/few_step.md`` and a picture of seed 0's samples (``bench/results/few_step_grid.png``).

    PYTHONPATH=. python bench/bench_few_step.py {all,train,judge} --teachers <race dir> [--seeds 0,1,2] [--out DIR]
        [--n 500]

``--teachers``: a directory holding ``difflab_s<seed>/run/checkpoints/last.ckpt`` (``bench_vs_diffusers.py``'s
difflab runs: the default recipe trained for the race's budget).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, RESULTS, machine_description, md_table, set_threads, shown_path, write_result  # noqa: E402

STUDENT_STEPS = {400: 8, 800: 4, 1200: 2, 1600: 1}  # experiment=digits_progressive: the end of each round
COLUMNS = [
    ("fd", "FD classifier", 2),
    ("fd_judge2", "FD judge 2", 2),
    ("fd_pixel", "FD pixels", 3),
    ("precision", "precision (clf)", 3),
    ("recall", "recall (clf)", 3),
    ("accuracy", "accuracy (clf)", 3),
    ("accuracy_judge2", "accuracy (j2)", 3),
]


def teacher_ckpt(teachers: Path, seed: int) -> Path:
    return teachers / f"difflab_s{seed}" / "run" / "checkpoints" / "last.ckpt"


def train_phase(args) -> None:
    from hydra import compose, initialize_config_dir

    from difflab.pipeline import train

    for seed in args.seeds:
        run = args.out / f"pd_s{seed}"
        if (run / "meta.json").exists():
            print(f"[few-step] seed {seed}: done, skipped")
            continue
        overrides = [
            "experiment=digits_progressive",
            f"method.teacher_ckpt={teacher_ckpt(args.teachers, seed)}",
            f"seed={seed}",
            f"paths.output_dir={run}",
            f"paths.root_dir={REPO}",
            "~callbacks.progress_bar",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            *args.override,
        ]
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        print(f"[few-step] seed {seed}: distilling {shown_path(teacher_ckpt(args.teachers, seed))}")
        t0 = time.perf_counter()
        objs = train(cfg)
        meta = {"seed": seed, "steps": int(objs["trainer"].global_step), "train_s": time.perf_counter() - t0}
        meta["machine"] = machine_description()
        meta["overrides"] = list(args.override)
        (run / "meta.json").write_text(json.dumps(meta, indent=1))


class Counted(torch.nn.Module):
    """The network with a count of the sample rows it has evaluated (CFG's conditional + unconditional pass: 2)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x, *args, **kwargs):
        self.rows += x.shape[0]
        return self.net(x, *args, **kwargs)


def draw(diffusion, net, n: int, seed: int, steps: int | None) -> tuple[torch.Tensor, float]:
    """``n`` balanced samples and the network evaluations per sample (NFE, guidance's extra passes counted);
    ``steps``: DDIM at that many steps on the halving grid (None: the checkpoint's own sampler)."""
    from difflab.diffusion.samplers import ddim

    sampler = None
    if steps is not None:
        diffusion.process.t_min = 0.0  # the grid that halves (the students'): evenly spaced down to 0
        sampler = functools.partial(ddim, steps=steps)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *diffusion.sample_shape), generator=g)
    labels = torch.arange(n) % 10
    counted = Counted(net)
    with torch.no_grad():
        images = diffusion.sample(counted, n, labels, sampler=sampler, noise=noise, generator=g)
    return images, counted.rows / n


def judge_phase(args) -> str:
    from difflab.ablation.stats import mean_ci
    from difflab.diffusion.system import load_for_sampling
    from difflab.eval.digits_eval import evaluate_samples, real_floor_metrics
    from difflab.utils.images import make_grid, save_png, to_uint8

    labels = torch.arange(args.n) % 10
    scores: dict[str, list[dict]] = {}
    pictures: dict[str, torch.Tensor] = {}
    costs = []
    for seed in args.seeds:
        teacher = teacher_ckpt(args.teachers, seed)
        rows = [("teacher, its own sampler (heun-10)", teacher, None)]
        rows += [(f"teacher, DDIM-{k}", teacher, k) for k in (8, 4, 2, 1)]
        ckpts = args.out / f"pd_s{seed}" / "checkpoints"
        rows += [
            (f"progressive student, DDIM-{k}", ckpts / f"step_{step:07d}.ckpt", k) for step, k in STUDENT_STEPS.items()
        ]
        for name, path, steps in rows:
            diffusion, net = load_for_sampling(path)
            images, nfe = draw(diffusion, net, args.n, seed, steps)
            scores.setdefault(name, []).append({**evaluate_samples(images, labels), "nfe": nfe})
            if seed == args.seeds[0]:
                pictures[name] = images[:40]
            print(f"[few-step] seed {seed} {name}: FD {scores[name][-1]['fd']:.2f}")
        meta = json.loads((args.out / f"pd_s{seed}" / "meta.json").read_text())
        race = teacher.parents[2] / "meta.json"
        if race.exists():
            t = json.loads(race.read_text())
            costs.append((meta["train_s"] / meta["steps"]) / (t["train_s"] / t["steps"]))
    floor = real_floor_metrics(args.n)
    header = ["sampler", "NFE (guidance counted)", *[label for _, label, _ in COLUMNS]]
    table = []
    for name, runs in scores.items():
        nfe = f"{sum(r['nfe'] for r in runs) / len(runs):g}"
        cells = []
        for key, _, digits in COLUMNS:
            iv = mean_ci([r[key] for r in runs])
            cells.append(
                f"{iv.mean:.{digits}f}"
                if iv.n < 2
                else f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"
            )
        table.append([name, nfe, *cells])
    table.append([f"{args.n} real digits (floor)", "", *[f"{floor[k]:.{d}f}" for k, _, d in COLUMNS]])
    order = list(pictures)
    grid = torch.cat([pictures[k][:20] for k in order])
    folder = Path(os.environ.get("DIFFLAB_BENCH_RESULTS") or RESULTS)  # as write_result chooses it
    folder.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(to_uint8(grid), nrow=20), folder / "few_step_grid.png", upscale=3)
    targets = []
    own = scores["teacher, its own sampler (heun-10)"]
    mean = lambda runs, key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
    for steps, limit in ((1, 2.0), (2, 1.3)):
        runs = scores[f"progressive student, DDIM-{steps}"]
        for key, label, _ in COLUMNS[:3]:
            ratio = mean(runs, key) / mean(own, key)
            targets.append(
                f"{steps}-step {label} {ratio:.2f}x the teacher's ({'met' if ratio <= limit else 'not met'})"
            )
        acc = mean(runs, "accuracy")
        targets.append(f"{steps}-step accuracy {acc:.3f} ({'met' if acc >= 0.99 else 'not met'})")
    verdict = "met" if all(t.endswith("(met)") for t in targets) else "not met"
    cost = (
        f" A distillation step costs {sum(costs) / len(costs):.2f}x a teacher training step (wall-clock per optimizer "
        f"step, each seed's distillation run against its teacher's race run; the teacher's two guided DDIM steps per "
        f"sample run without gradients)."
        if costs
        else ""
    )
    return (
        "# Few-step generation on digits: progressive distillation against its teacher\n\n"
        f"`PYTHONPATH=. python bench/bench_few_step.py judge --teachers {shown_path(args.teachers)} --seeds "
        f"{','.join(map(str, args.seeds))} --n {args.n}`. Teachers: the default recipe's race runs (one per seed); "
        f"students: `experiment=digits_progressive` (DDIM 16 -> 1 in 4 rounds of 400 steps), the checkpoint at each "
        f"round's end. {args.n} balanced samples per run, every judge of `difflab.eval.digits_eval.evaluate_samples`, "
        f"means with 95% t-intervals over {len(args.seeds)} seeds. Rows in order of the picture "
        f"(`few_step_grid.png`: 20 samples of seed {args.seeds[0]} per row).{cost}\n\n"
        + md_table(header, table)
        + f"\n\nTargets (1 step within 2x the teacher's own-sampler FD and 2 steps within 1.3x, in every judge; "
        f"accuracy >= 0.99): {verdict}: {'; '.join(targets)}.\n" + f"\nMachine: {machine_description()}\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["all", "train", "judge"])
    p.add_argument("--teachers", type=Path, required=True, help="a directory with difflab_s<seed>/run/checkpoints")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, default=Path("/tmp/difflab_few_step"))
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for the distillation runs")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    set_threads(args.threads)
    if args.phase in ("all", "train"):
        train_phase(args)
    if args.phase in ("all", "judge"):
        print(f"wrote {write_result('few_step', judge_phase(args))}")


if __name__ == "__main__":
    main()
