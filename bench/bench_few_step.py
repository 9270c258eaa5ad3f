"""Few-step generation on digits: progressive distillation (``experiment=digits_progressive``), reflow
(``experiment=digits_reflow``), consistency distillation with ECT's gaps (``experiment=digits_consistency``) and in
continuous time (sCM, ``experiment=digits_scm``) of default-recipe teachers, easy consistency tuning without a teacher
(ECT, method ``ect``: ``experiment=digits_consistency init_from=<teacher>``; sCT, method ``sct``: ``experiment=digits_scm
init_from=<teacher>``; both judged unguided and with CFG 2), and
MeanFlow from scratch
(``experiment=digits_meanflow``), judged at 1, 2, 4 (and 8) steps against the teacher at the same steps and at its own
19-NFE sampler; and progressive distillation with the guidance baked in (``experiment=digits_progressive_guided``,
method ``guided``: one student for every scale in [1, 4]) judged at each of ``--scales`` against the teacher's own
sampler at that scale and the fixed-scale progressive student; likewise reflow and consistency distillation with
the guidance baked in (``experiment=digits_reflow_guided``, method ``reflow_guided``;
``experiment=digits_consistency_guided``, method ``consistency_guided``, and ``experiment=digits_scm_guided``, method
``scm_guided`` (teachers with ``process.time_scale=1``), for the budget B).

Phases:
- ``train``: for each seed, ``python train.py experiment=digits_progressive method.teacher_ckpt=<teacher of that
  seed> seed=<seed>`` through ``difflab.pipeline.train`` (run directory ``<out>/pd_s<seed>``); the guided student
  the same way (``experiment=digits_progressive_guided``, ``<out>/gpd_s<seed>``); the guided reflow student
  (``experiment=digits_reflow_guided``: its couplings drawn first, ``<out>/grf_pairs_s<seed>``, then its steps,
  ``<out>/grf_s<seed>``); the consistency
  and sCM students (``<out>/cm_s<seed>``, ``<out>/scm_s<seed>``; guided: ``<out>/gcm_s<seed>``,
  ``<out>/gscm_s<seed>``) and the ECT run (``<out>/ect_s<seed>``) for the budget B, the progressive run's wall-clock
  or ``--budget`` (``trainer.max_time``); MeanFlow from scratch for the teacher's race wall-clock plus B
  (``<out>/mf_s<seed>``); reflow: a 1-step run
  that draws the teacher's couplings into ``<out>/pairs`` (timed: ``pairs_s``), then the student for B
  (``<out>/rf_s<seed>``). Each run's wall-clock and step count go to its ``meta.json``; the cost per step
  against the teacher's own training step is read from the teacher's race ``meta.json`` when there is one.
- ``judge``: each seed's teacher and its students (progressive: the checkpoint at the end of each round, 8, 4, 2, 1
  DDIM steps (the rounds read from the run's stored ``method``), the teacher at DDIM 64, 32 and 16 beside it;
  reflow: the last checkpoint at Euler 4, 2, 1, guided reflow at each of ``--scales`` too; consistency and sCM: the
  last checkpoint at consistency sampling 4, 2, 1, the guided ones at each of ``--scales``; MeanFlow: the last
  checkpoint at MeanFlow sampling 4, 2, 1) draw ``--n`` balanced samples (labels i % 10, noise seeded by the seed),
  and every judge of ``difflab.eval.digits_eval.evaluate_samples`` scores them; means with 95% t-intervals over the
  seeds; real digits give the floors. The teacher at few steps samples with DDIM on the students' grid (flow's grid
  evenly to 0, the recipe's grid shift; ``--spacing``: another shift for the consistency-family students only) with
  its own guidance; students sample unguided, as they were trained. Writes ``bench/results/few_step.md``, a picture
  of seed 0's samples (``bench/results/few_step_grid.png``), and the same scores as a sweep ``ablate.py`` summarises
  (``<out>/judged``; its summary closes few_step.md).

    PYTHONPATH=. python bench/bench_few_step.py {all,train,judge} --teachers <race dir> [--seeds 0,1,2] [--out DIR]
        [--n 500] [--methods progressive,reflow,consistency,scm,meanflow,guided,reflow_guided,consistency_guided,scm_guided] [--scales 1,2,3]
        [--budget S] [--override key=value ...] [--progressive-override key=value ...]
        [--teacher-override key=value ...] [--spacing S] [--paired-with DIR]

``--budget``: B in seconds, instead of the progressive run's wall-clock (needed when there is no progressive run).
``--progressive-override``: only for the progressive and guided progressive runs (their rounds and rate), where
``--override`` reaches every run.
``--spacing``: the grid shift the consistency-family students sample on (``sampler.spacing``; 2 steps re-noise at
t = s / (1 + s)), e.g. the one a ``sample.py -m sampler.spacing=...`` sweep on other noise seeds chose.
``--override``: a Hydra override for every student run (``process.time_scale=1`` for teachers trained with it).
``--teacher-override``: train each missing teacher with ``bench_vs_diffusers.py train --sides difflab --override``
it (300 s) first; a teacher already there must have been trained with the same overrides.
``--paired-with``: another ``--out`` judged on the same teachers, seeds and ``--n`` (two arms of one method, e.g. two
round schedules); the result closes with each sampler row's paired difference, this run minus that one.

Latent digits (``configs/latent/digits.yaml``): the same commands with ``--teacher-override +latent=digits
--teacher-override datamodule.cache_dir=<cache>`` and ``--override`` the same two for the students; the judges see
the decoded samples, and a row gives the judges' reading of real digits encoded and decoded by the teachers'
autoencoder (what the latent space costs real data).

``--teachers``: a directory holding ``difflab_s<seed>/run/checkpoints/last.ckpt`` (``bench_vs_diffusers.py``'s
difflab runs: the default recipe trained for the race's budget).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import QUIET, REPO, RESULTS, machine_description, md_table, set_threads, shown_path, write_result  # noqa: E402

RECIPE_SCALE = 2.0  # the recipe's guidance scale (guidance=cfg_interval): the teacher's own-sampler row
# students trained for the budget B (the progressive run's wall-clock or --budget): method -> (prefix, label, sampler)
SAME_CLOCK = {
    "consistency": ("cm", "CM", "consistency"),
    "scm": ("scm", "sCM", "consistency"),
    "ect": ("ect", "ECT", "consistency"),
    "sct": ("sct", "sCT", "consistency"),
}
# no teacher: tuned from the teacher's weights (init_from) on the data alone; judged unguided and with CFG too
TUNED = {"ect": "experiment=digits_consistency", "sct": "experiment=digits_scm"}
TUNED_CFG = 2.0  # the CFG scale the tuned students are also judged at (they train with dropped conditions)
# trained from scratch for the teacher's race wall-clock plus B: the compute of teacher + student
FROM_SCRATCH = {"meanflow": ("mf", "MF", "meanflow")}
ONE_RUN = {**SAME_CLOCK, **FROM_SCRATCH}  # methods judged on one run's last checkpoint
# the guidance scale as the student's input, its last checkpoint judged at each of --scales:
# method -> (prefix, who, label, sampler); those trained for the budget B from experiment=digits_<method>
GUIDED_SAME_CLOCK = {
    "consistency_guided": ("gcm", "guided consistency", "CM", "consistency"),
    "scm_guided": ("gscm", "guided sCM", "sCM", "consistency"),
}
GUIDED_ONE_RUN = {"reflow_guided": ("grf", "guided reflow", "Euler", "euler"), **GUIDED_SAME_CLOCK}
COLUMNS = [
    ("fd", "FD classifier", 2),
    ("fd_judge2", "FD judge 2", 2),
    ("fd_pixel", "FD pixels", 3),
    ("precision", "precision (clf)", 3),
    ("recall", "recall (clf)", 3),
    ("accuracy", "accuracy (clf)", 3),
    ("accuracy_judge2", "accuracy (j2)", 3),
]


def progressive_method(ckpts: Path) -> dict:
    """The ``method`` config a progressive run stored in its last checkpoint (its rounds)."""
    from difflab.checkpoints import load_checkpoint, run_config

    return run_config(load_checkpoint(ckpts / "last.ckpt"), ckpts / "last.ckpt")["method"]


def round_ends(ckpts: Path) -> dict[int, int]:
    """A progressive run's checkpoints at the end of each round: optimizer step -> the DDIM steps its student takes
    (``teacher_steps`` halved at the end of each round of ``steps_per_round`` steps, or of each listed length), up
    to 8."""
    from difflab.methods.rounds import round_count, round_lengths

    method = progressive_method(ckpts)
    teacher, per_round, last = method["teacher_steps"], method["steps_per_round"], method["student_steps"]
    lengths = round_lengths(per_round, round_count(teacher, last))
    ends = {end: teacher >> r for r, end in enumerate(itertools.accumulate(lengths), 1)}
    return {step: k for step, k in ends.items() if k <= 8}


def teacher_ckpt(teachers: Path, seed: int) -> Path:
    return teachers / f"difflab_s{seed}" / "run" / "checkpoints" / "last.ckpt"


def run_train(cfg_overrides: list[str], run: Path) -> dict:
    """One training run through ``difflab.pipeline.train``; its wall-clock and step count."""
    from hydra import compose, initialize_config_dir

    from difflab.pipeline import train

    overrides = [
        *cfg_overrides,
        f"paths.output_dir={run}",
        f"paths.root_dir={REPO}",
        *QUIET,
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    t0 = time.perf_counter()
    objs = train(cfg)
    return {"steps": int(objs["trainer"].global_step), "train_s": time.perf_counter() - t0}


def write_meta(run: Path, meta: dict, args, extra: list[str] | None = None) -> None:
    meta["machine"] = machine_description()
    meta["overrides"] = [*args.override, *(extra or [])]
    (run / "meta.json").write_text(json.dumps(meta, indent=1))


def train_teacher(args, seed: int) -> None:
    """The race's difflab side for ``seed`` with ``--teacher-override`` (``bench_vs_diffusers.py train``), when
    ``--teachers`` lacks it: teachers of another setup (sCM's ``process.time_scale=1``) from the same command."""
    overrides = [part for o in args.teacher_override for part in ("--override", o)]
    command = [sys.executable, str(REPO / "bench" / "bench_vs_diffusers.py"), "train", "--sides", "difflab"]
    command += ["--seeds", str(seed), "--out", str(args.teachers), "--threads", str(args.threads), *overrides]
    print(f"[few-step] seed {seed}: training the teacher ({' '.join(args.teacher_override)})")
    subprocess.run(command, check=True)


def train_phase(args) -> None:
    for seed in args.seeds:
        teacher = teacher_ckpt(args.teachers, seed)
        if args.teacher_override:
            made = run_overrides(teacher.parents[2] / "meta.json")
            if teacher.exists() and sorted(made) != sorted(args.teacher_override):
                sys.exit(
                    f"{teacher}: trained with {made}, not --teacher-override {args.teacher_override}: give another --teachers"
                )
            if not teacher.exists():
                train_teacher(args, seed)
        run = args.out / f"pd_s{seed}"
        if "progressive" in args.methods and not (run / "meta.json").exists():
            print(f"[few-step] seed {seed}: distilling {shown_path(teacher)} (progressive)")
            overrides = ["experiment=digits_progressive", f"method.teacher_ckpt={teacher}", f"seed={seed}"]
            made = run_train(overrides + args.override + args.progressive_override, run)
            write_meta(run, {"seed": seed, **made}, args, args.progressive_override)
        guided = args.out / f"gpd_s{seed}"
        if "guided" in args.methods and not (guided / "meta.json").exists():
            print(f"[few-step] seed {seed}: distilling {shown_path(teacher)} with the guidance scale as input")
            overrides = ["experiment=digits_progressive_guided", f"method.teacher_ckpt={teacher}", f"seed={seed}"]
            made = run_train(overrides + args.override + args.progressive_override, guided)
            write_meta(guided, {"seed": seed, **made}, args, args.progressive_override)
        guided_reflow = args.out / f"grf_s{seed}"
        if "reflow_guided" in args.methods and not (guided_reflow / "meta.json").exists():
            common = [
                "experiment=digits_reflow_guided",
                f"method.teacher_ckpt={teacher}",
                f"method.pairs_dir={args.out}/pairs",
            ]
            print(f"[few-step] seed {seed}: drawing the couplings of {shown_path(teacher)}, each at its own scale")
            first = [*common, *args.override, "trainer.max_steps=1", f"seed={seed}"]  # the same setup, one step
            pairs = run_train(first, args.out / f"grf_pairs_s{seed}")
            print(f"[few-step] seed {seed}: reflow student with the guidance scale as input")
            out = run_train(common + [f"seed={seed}"] + args.override, guided_reflow)
            write_meta(guided_reflow, {"seed": seed, **out, "pairs_s": pairs["train_s"]}, args)
        if args.budget is not None:
            budget = args.budget
        elif (run / "meta.json").exists():
            budget = json.loads((run / "meta.json").read_text())["train_s"]
        else:
            continue  # the other methods' budgets are the progressive run's
        clock = f"00:00:{int(budget) // 60:02d}:{int(budget) % 60:02d}"
        same_clock = [f"seed={seed}", "trainer.max_steps=100000", f"trainer.max_time={clock}"]
        for method, prefix in [(m, v[0]) for m, v in (SAME_CLOCK | GUIDED_SAME_CLOCK).items()]:
            if method not in args.methods or (args.out / f"{prefix}_s{seed}" / "meta.json").exists():
                continue
            print(f"[few-step] seed {seed}: {method} student for {clock}")
            if method in TUNED:
                overrides = [TUNED[method], f"init_from={teacher}", *same_clock]
            else:
                overrides = [f"experiment=digits_{method}", f"method.teacher_ckpt={teacher}", *same_clock]
            out = run_train(overrides + args.override, args.out / f"{prefix}_s{seed}")
            write_meta(args.out / f"{prefix}_s{seed}", {"seed": seed, **out, "clock": clock}, args)
        race = teacher.parents[2] / "meta.json"
        if "meanflow" in args.methods and not (args.out / f"mf_s{seed}" / "meta.json").exists():
            total = budget + json.loads(race.read_text())["train_s"]
            both = f"00:00:{int(total) // 60:02d}:{int(total) % 60:02d}"
            print(
                f"[few-step] seed {seed}: meanflow from scratch for {both} (the teacher's race and the students' budget)"
            )
            overrides = [
                "experiment=digits_meanflow",
                f"seed={seed}",
                "trainer.max_steps=100000",
                f"trainer.max_time={both}",
            ]
            out = run_train(overrides + args.override, args.out / f"mf_s{seed}")
            write_meta(args.out / f"mf_s{seed}", {"seed": seed, **out, "clock": both}, args)
        if "reflow" not in args.methods or (args.out / f"rf_s{seed}" / "meta.json").exists():
            continue
        # the couplings first (a 1-step run that draws them), then the student for the budget
        common = ["experiment=digits_reflow", f"method.teacher_ckpt={teacher}", f"method.pairs_dir={args.out}/pairs"]
        print(f"[few-step] seed {seed}: drawing the couplings of {shown_path(teacher)} (reflow)")
        first = [*common, *args.override, "trainer.max_steps=1", f"seed={seed}"]  # the same setup, one step
        pairs = run_train(first, args.out / f"rf_pairs_s{seed}")
        print(f"[few-step] seed {seed}: reflow student for {clock}")
        overrides = common + same_clock
        out = run_train(overrides + args.override, args.out / f"rf_s{seed}")
        write_meta(args.out / f"rf_s{seed}", {"seed": seed, **out, "pairs_s": pairs["train_s"], "clock": clock}, args)


class Counted(torch.nn.Module):
    """The network with a count of the sample rows it has evaluated (CFG's conditional + unconditional pass: 2)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x, *args, **kwargs):
        self.rows += x.shape[0]
        return self.net(x, *args, **kwargs)


def draw(
    diffusion,
    net,
    n: int,
    seed: int,
    steps: int | None,
    kind: str = "ddim",
    scale: float | None = None,
    spacing: float | None = None,
) -> tuple[torch.Tensor, float]:
    """``n`` balanced samples and the network evaluations per sample (NFE, guidance's extra passes counted);
    ``steps``: ``kind`` (a sampler of ``difflab.diffusion.samplers``) at that many steps on the grid evenly to 0
    (None: the checkpoint's own sampler), shifted by ``spacing`` (None: the process's sampling shift); ``scale``: the
    guidance scale (None: the checkpoint's)."""
    from difflab.diffusion import samplers

    sampler = None
    if steps is not None:
        diffusion.process.t_min = 0.0  # the grid that halves (the students'): evenly spaced down to 0
        sampler = functools.partial(getattr(samplers, kind), steps=steps, spacing=spacing)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *diffusion.sample_shape), generator=g)
    labels = torch.arange(n) % 10
    counted = Counted(net)
    with torch.no_grad():
        guidance = None if scale is None else {"scale": scale}
        images = diffusion.sample(counted, n, labels, sampler=sampler, noise=noise, generator=g, guidance=guidance)
    return images, counted.rows / n


def verdict(who: str, runs_at: dict[int, list[dict] | None], reference: list[dict]) -> str:
    """The targets line of a student (``runs_at[steps]``: its scores per seed at 1 and 2 steps, None where the run has
    no such student) against ``reference`` (the teacher's own sampler): 1 step within 2x and 2 steps within 1.3x its
    FD in every judge, accuracy >= 0.99."""
    mean = lambda runs, key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
    targets = []
    for steps, limit in ((1, 2.0), (2, 1.3)):
        runs = runs_at.get(steps)
        if not runs:
            targets.append(f"{steps}-step: no student of the run samples at {steps} (not met)")
            continue
        for key, label, _ in COLUMNS[:3]:
            ratio = mean(runs, key) / mean(reference, key)
            targets.append(f"{steps}-step {label} {ratio:.2f}x ({'met' if ratio <= limit else 'not met'})")
        acc = mean(runs, "accuracy")
        targets.append(f"{steps}-step accuracy {acc:.3f} ({'met' if acc >= 0.99 else 'not met'})")
    met = "met" if all(t.endswith("(met)") for t in targets) else "not met"
    return f"**{who}: {met}**: {'; '.join(targets)}"


def tuned_cfg_row(method: str, label: str, steps: int) -> str:
    """The row of a student tuned without a teacher, sampled with CFG (``TUNED_CFG``, NFE doubled)."""
    return f"{method} student, {label}-{steps}, CFG {TUNED_CFG:g}"


def own_row(scale: float) -> str:
    """The teacher's own-sampler row at a guidance scale (the recipe's scale: the plain row)."""
    base = "teacher, its own sampler (heun-10)"
    return base if scale == RECIPE_SCALE else f"{base}, w={scale:g}"


def teacher_at(rows: list[tuple], teacher: Path, w: float) -> list[tuple]:
    """The teacher's own-sampler row at scale ``w`` where ``rows`` lacks it (at the recipe's scale: the plain row)."""
    made = w == RECIPE_SCALE or any(row[0] == own_row(w) for row in rows)
    return [] if made else [(own_row(w), teacher, None, "ddim", w)]


def arm_name(row: str) -> str:
    """A row's arm for ablate.py: 'reflow student, Euler-1' -> 'reflow_euler1'; 'guided student, DDIM-1, w=3' ->
    'guided_ddim1_w3'."""
    who, sampler, *scale = row.split(", ")
    scale_tag = "".join(f"_{w.replace('=', '').replace('.', 'p')}" for w in scale)
    if "own sampler" in row:
        return "teacher_own" + scale_tag
    words = who.split()
    name = "_".join(words[:-1]) if words[-1] == "student" else words[0]  # 'guided reflow student' -> guided_reflow
    return f"{name}_{sampler.lower().replace('-', '')}{scale_tag}"


def ablate_summary(scores: dict[str, list[dict]], args) -> str:
    """Every (row, seed) as a job of a sweep that ``ablate.py`` reads (``arm=<row>``, ``seed=<s>``, the scores in
    final_metrics.json); its summary against the teacher's own sampler, paired by seed."""
    import shutil

    from difflab.ablate import main as ablate
    from difflab.metrics.protocol import write_protocol
    from difflab.utils.run_record import write_final_metrics

    sweep = args.out / "judged"
    shutil.rmtree(sweep, ignore_errors=True)
    job = 0
    for row, runs in scores.items():
        for seed, run in zip(args.seeds, runs):
            folder = sweep / str(job)
            (folder / ".hydra").mkdir(parents=True)
            (folder / ".hydra" / "overrides.yaml").write_text(f"- arm={arm_name(row)}\n- seed={seed}\n")
            metrics = {f"eval/{k}": float(v) for k, v in run.items() if k in {c for c, _, _ in COLUMNS} | {"nfe"}}
            write_final_metrics(folder, metrics, step=0)
            write_protocol(
                folder, {m: {"eval_seed": seed, "n_samples": args.n} for m in metrics}
            )  # same noise per seed
            job += 1
    metrics = ["eval/fd", "eval/fd_judge2", "eval/fd_pixel", "eval/accuracy", "eval/nfe"]
    ablate([str(sweep), "--metrics", *metrics, "--baseline", "arm=teacher_own", "--out", str(sweep / "ablation")])
    return (sweep / "ablation" / "summary.md").read_text()


PAIRED_METRICS = [
    ("eval/fd", "FD classifier", 2),
    ("eval/fd_judge2", "FD judge 2", 3),
    ("eval/fd_pixel", "FD pixels", 3),
    ("eval/accuracy", "accuracy (clf)", 4),
]


def paired_section(out: Path, other: Path) -> str:
    """Each sampler row of ``out``'s students minus the same row of ``other``'s at the same seed (both judged sweeps,
    ``<dir>/judged``): the paired difference with its 95% t-interval and unadjusted p, for two arms of one method on
    the same teachers and judging noise. Teacher rows are listed only where they differ (they should not)."""
    from difflab.ablation.stats import paired_difference
    from difflab.ablation.sweep import read_sweep

    def by_arm(folder: Path) -> dict[str, dict[str, dict[str, float]]]:
        table: dict[str, dict[str, dict[str, float]]] = {}
        for job in read_sweep(folder / "judged").jobs:
            values = {m: job.series[m][-1][1] for m, _, _ in PAIRED_METRICS if job.series.get(m)}
            table.setdefault(job.overrides["arm"], {})[str(job.seed)] = values
        return table

    mine, theirs = by_arm(out), by_arm(other)
    rows, same_teacher = [], True
    for arm, seeds in mine.items():
        shared = sorted(set(seeds) & set(theirs.get(arm, {})), key=int)
        if len(shared) < 2:
            continue
        cells = []
        for metric, _, digits in PAIRED_METRICS:
            d = paired_difference([seeds[s][metric] for s in shared], [theirs[arm][s][metric] for s in shared])
            same = d.mean == 0 and d.sd == 0
            cells.append(
                "same in every seed"
                if same
                else f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}] (p {d.p_value:.2g})"
            )
        differs = any(seeds[s] != theirs[arm][s] for s in shared)
        if arm.startswith("teacher") and not differs:
            continue
        same_teacher &= not arm.startswith("teacher")
        rows.append([arm, ",".join(shared), *cells])
    if not rows:
        return f"\nNo sampler row of `{shown_path(other)}` shares two seeds with this run: nothing to pair.\n"
    header = ["sampler row", "seeds", *(f"{label}: this - other" for _, label, _ in PAIRED_METRICS)]
    note = (
        "teacher rows identical in both" if same_teacher else "**teacher rows differ: not the same teachers or noise**"
    )
    return (
        f"\nPaired by seed against `{shown_path(other)}` (this run's students minus that run's, the same sampler row; "
        f"95% t-intervals, p unadjusted; {note}):\n\n" + md_table(header, rows) + "\n"
    )


def run_overrides(meta_path: Path) -> list[str]:
    """The extra Hydra overrides a bench run recorded in its meta.json (none when it has no file)."""
    return list(json.loads(meta_path.read_text()).get("overrides", [])) if meta_path.exists() else []


def describe_teachers(args) -> str:
    """Where the teachers come from, with the overrides they were trained with (seed 0's meta.json)."""
    extra = run_overrides(teacher_ckpt(args.teachers, args.seeds[0]).parents[2] / "meta.json")
    return "the default recipe's race runs (one per seed)" + (f" trained with `{' '.join(extra)}`" if extra else "")


def describe_students(args) -> str:
    """One phrase per judged method: its experiment, budget, checkpoints and extra overrides (first seed's run)."""
    from difflab.methods.rounds import round_count

    seed = args.seeds[0]

    def budget(prefix: str) -> str:
        meta = args.out / f"{prefix}_s{seed}" / "meta.json"
        clock = json.loads(meta.read_text()).get("clock") if meta.exists() else None
        extra = run_overrides(meta)
        text = f"`trainer.max_time={clock}`" if clock else "the progressive run's wall-clock"
        return text + (f", `{' '.join(extra)}`" if extra else "")

    def steps(prefix: str) -> str:
        meta = args.out / f"{prefix}_s{seed}" / "meta.json"
        made = json.loads(meta.read_text()) if meta.exists() else {}
        extra = run_overrides(meta)
        return f"{made.get('steps', '?')} steps" + (f", `{' '.join(extra)}`" if extra else "")

    def rounds(prefix: str) -> str:
        ckpts = args.out / f"{prefix}_s{seed}" / "checkpoints"
        if not (ckpts / "last.ckpt").exists():
            return "?"
        m = progressive_method(ckpts)
        count = round_count(m["teacher_steps"], m["student_steps"])
        extra = run_overrides(ckpts.parent / "meta.json")
        per_round = m["steps_per_round"]
        length = f"{per_round}" if isinstance(per_round, int) else "/".join(map(str, per_round))
        made = f"DDIM {m['teacher_steps']} -> {m['student_steps']} in {count} rounds of {length} steps"
        return made + (f", `{' '.join(extra)}`" if extra else "")

    phrases = {
        "progressive": f"`experiment=digits_progressive` ({rounds('pd') if 'progressive' in args.methods else ''}), "
        "the checkpoint at each round's end",
        "reflow": f"`experiment=digits_reflow` (16384 couplings of the teacher's own sampler, then {budget('rf')} of "
        "training), its last checkpoint",
        "consistency": "`experiment=digits_consistency` (consistency distillation with ECT's gaps, "
        f"{budget('cm')}), its last checkpoint",
        "scm": f"`experiment=digits_scm` (continuous-time consistency distillation, sCM, {budget('scm')}), its last "
        "checkpoint",
        "ect": f"`experiment=digits_consistency init_from=<teacher>` without `method.teacher_ckpt` (easy consistency "
        f"tuning, ECT: the teacher's weights tuned on the data alone, {budget('ect')}), its last checkpoint unguided "
        f"and with CFG {TUNED_CFG:g}",
        "sct": f"`experiment=digits_scm init_from=<teacher>` without `method.teacher_ckpt` (continuous-time "
        f"consistency tuning, sCT: the teacher's weights tuned on the data alone, {budget('sct')}), its last "
        f"checkpoint unguided and with CFG {TUNED_CFG:g}",
        "meanflow": f"`experiment=digits_meanflow` (MeanFlow from scratch, {budget('mf')}: the teacher's race "
        "wall-clock plus the students' budget), its last checkpoint",
        "guided": f"`experiment=digits_progressive_guided` ({rounds('gpd') if 'guided' in args.methods else ''}, the "
        "guidance scale drawn from [1, 4] per sample and given to the student as input), each round's checkpoint at "
        f"the scales {args.scales}",
        "reflow_guided": "`experiment=digits_reflow_guided` (16384 couplings of the teacher's own sampler, each at a "
        f"guidance scale drawn from [1, 4] and kept with it, then {steps('grf')} of training with the scale as the "
        f"student's input), its last checkpoint at the scales {args.scales}",
        "consistency_guided": "`experiment=digits_consistency_guided` (consistency distillation with ECT's gaps, the "
        "teacher's step guided at a scale drawn from [1, 4] per sample and given to the student as input, "
        f"{budget('gcm')}), its last checkpoint at the scales {args.scales}",
        "scm_guided": "`experiment=digits_scm_guided` (sCM, the teacher's velocity guided at a scale drawn from [1, 4] "
        f"per sample and given to the student as input, {budget('gscm')}), its last checkpoint at the scales "
        f"{args.scales}",
    }
    return "; ".join(phrases[m] for m in args.methods if m in phrases)


def spread(seeds: int) -> str:
    """How the table summarises its runs: one seed's scores, or means with intervals over several."""
    return "one seed (no intervals)" if seeds == 1 else f"means with 95% t-intervals over {seeds} seeds"


def autoencoder_floor(checkpoint: Path, n: int) -> dict | None:
    """The judges' reading of real digits after a round trip through a latent teacher's autoencoder, laid out as
    ``real_floor_metrics`` (precision / recall from held-out digits); None for a pixel teacher."""
    from difflab.datamodules.digits import load_digits_tensors
    from difflab.diffusion.system import load_for_sampling
    from difflab.eval.digits_eval import evaluate_samples, precision_recall_halves

    diffusion, _ = load_for_sampling(checkpoint)
    if diffusion.autoencoder is None:
        return None
    x, y = load_digits_tensors(16)

    def round_trip(idx: torch.Tensor) -> dict:
        with torch.no_grad():
            latents = diffusion.autoencoder.module.encode(x[idx])
        return evaluate_samples(diffusion.to_pixels(latents).clamp(-1, 1), y[idx])

    out = round_trip(torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n])  # the floor's subset
    held_out = round_trip(precision_recall_halves(len(x))[1][:n])  # none of them in the k-NN reference
    return {**out, **{k: v for k, v in held_out.items() if k.startswith(("precision", "recall"))}}


def positive(text: str) -> float:
    """An argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    return value


def spacing_flag(args) -> str:
    """The ``--spacing`` part of the judge command line."""
    return "" if args.spacing is None else f" --spacing {args.spacing:g}"


def describe_spacing(args) -> str:
    """Which grid the consistency-family students sample on (the time 2 steps re-noise at)."""
    consistency_family = [m for m in args.methods if m in SAME_CLOCK or m in GUIDED_SAME_CLOCK]
    if args.spacing is None or not consistency_family:
        return ""
    t_mid = args.spacing / (1 + args.spacing)
    return f"Consistency sampling on the grid shifted by {args.spacing:g} (2 steps re-noise at t = {t_mid:.2f}). "


def judge_phase(args) -> str:
    from difflab.ablation.stats import mean_ci
    from difflab.diffusion.system import load_for_sampling
    from difflab.eval.digits_eval import evaluate_samples, real_floor_metrics
    from difflab.utils.images import make_grid, save_png, to_uint8

    labels = torch.arange(args.n) % 10
    scores: dict[str, list[dict]] = {}
    pictures: dict[str, torch.Tensor] = {}
    costs: dict[str, list[tuple]] = {}
    for seed in args.seeds:
        teacher = teacher_ckpt(args.teachers, seed)
        rows = [("teacher, its own sampler (heun-10)", teacher, None, "ddim")]
        rows += [(f"teacher, DDIM-{k}", teacher, k, "ddim") for k in (8, 4, 2, 1)]
        if (
            "progressive" in args.methods
        ):  # what the first round's targets can reach: the teacher's DDIM at 16 to 64 steps
            rows[1:1] = [(f"teacher, DDIM-{k}", teacher, k, "ddim") for k in (64, 32, 16)]
            ckpts = args.out / f"pd_s{seed}" / "checkpoints"
            rows += [
                (f"progressive student, DDIM-{k}", ckpts / f"step_{step:07d}.ckpt", k, "ddim")
                for step, k in round_ends(ckpts).items()
            ]
        if "reflow" in args.methods:
            last = args.out / f"rf_s{seed}" / "checkpoints" / "last.ckpt"
            rows += [(f"reflow student, Euler-{k}", last, k, "euler") for k in (4, 2, 1)]
        for method, (prefix, label, kind) in ONE_RUN.items():
            if method in args.methods:
                last = args.out / f"{prefix}_s{seed}" / "checkpoints" / "last.ckpt"
                rows += [(f"{method} student, {label}-{k}", last, k, kind) for k in (4, 2, 1)]
        rows = [(*row, None) for row in rows]
        for method, (prefix, label, kind) in SAME_CLOCK.items():
            if method in args.methods and method in TUNED:
                last = args.out / f"{prefix}_s{seed}" / "checkpoints" / "last.ckpt"
                rows += [(tuned_cfg_row(method, label, k), last, k, kind, TUNED_CFG) for k in (4, 2, 1)]
        if "guided" in args.methods:
            ckpts = args.out / f"gpd_s{seed}" / "checkpoints"
            for w in args.scales:
                rows += teacher_at(rows, teacher, w)
                rows += [
                    (f"guided student, DDIM-{k}, w={w:g}", ckpts / f"step_{step:07d}.ckpt", k, "ddim", w)
                    for step, k in round_ends(ckpts).items()
                    if k <= 4
                ]
        for method, (prefix, who, label, kind) in GUIDED_ONE_RUN.items():
            if method in args.methods:
                last = args.out / f"{prefix}_s{seed}" / "checkpoints" / "last.ckpt"
                for w in args.scales:
                    rows += teacher_at(rows, teacher, w)
                    rows += [(f"{who} student, {label}-{k}, w={w:g}", last, k, kind, w) for k in (4, 2, 1)]
        for name, path, steps, kind, scale in rows:
            diffusion, net = load_for_sampling(path)
            spacing = args.spacing if kind == "consistency" else None
            images, nfe = draw(diffusion, net, args.n, seed, steps, kind, scale, spacing)
            scores.setdefault(name, []).append({**evaluate_samples(images, labels), "nfe": nfe})
            if seed == args.seeds[0]:
                pictures[name] = images[:40]
            print(f"[few-step] seed {seed} {name}: FD {scores[name][-1]['fd']:.2f}")
        race = teacher.parents[2] / "meta.json"
        for method, prefix in (
            ("progressive", "pd"),
            ("guided", "gpd"),
            *((m, v[0]) for m, v in GUIDED_ONE_RUN.items()),
            ("reflow", "rf"),
            *((m, v[0]) for m, v in ONE_RUN.items()),
        ):
            if method in args.methods and race.exists():
                meta = json.loads((args.out / f"{prefix}_s{seed}" / "meta.json").read_text())
                t = json.loads(race.read_text())
                cost = (meta["train_s"] / meta["steps"]) / (t["train_s"] / t["steps"])
                costs.setdefault(method, []).append((cost, meta["steps"], meta["train_s"], meta.get("pairs_s")))
    floor = real_floor_metrics(args.n)
    through = autoencoder_floor(teacher_ckpt(args.teachers, args.seeds[0]), args.n)
    summary = ablate_summary(scores, args)
    ablation = write_result(
        f"{args.name}_ablate",
        "# Few-step generation on digits, summarised by `ablate.py`\n\n" + summary.split("\n", 1)[1],
    )
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
    if through is not None:
        row = f"the same {args.n} real digits encoded and decoded by the teachers' autoencoder (the latent floor)"
        table.append([row, "", *[f"{through[k]:.{d}f}" for k, _, d in COLUMNS]])
    order = list(pictures)
    grid = torch.cat([pictures[k][:20] for k in order])
    folder = Path(os.environ.get("DIFFLAB_BENCH_RESULTS") or RESULTS)  # as write_result chooses it
    folder.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(to_uint8(grid), nrow=20), folder / f"{args.name}_grid.png", upscale=3)
    own = scores["teacher, its own sampler (heun-10)"]
    verdicts = []
    for method, sampler in (("progressive", "DDIM"), ("reflow", "Euler"), *((m, v[1]) for m, v in ONE_RUN.items())):
        if method in args.methods:
            verdicts.append(verdict(method, {k: scores.get(f"{method} student, {sampler}-{k}") for k in (1, 2)}, own))
    for method, (_, label, _) in SAME_CLOCK.items():
        if method in args.methods and method in TUNED:
            rows = {k: scores[tuned_cfg_row(method, label, k)] for k in (1, 2)}
            verdicts.append(verdict(f"{method} with CFG {TUNED_CFG:g}", rows, own))
    if "guided" in args.methods:  # one student for every scale: each against the teacher's own sampler at that scale
        for w in args.scales:
            rows = {k: scores.get(f"guided student, DDIM-{k}, w={w:g}") for k in (1, 2)}
            verdicts.append(verdict(f"guided student at w={w:g}", rows, scores[own_row(w)]))
    for method, (_, who, label, _) in GUIDED_ONE_RUN.items():  # likewise: one student for every scale
        if method in args.methods:
            for w in args.scales:
                rows = {k: scores[f"{who} student, {label}-{k}, w={w:g}"] for k in (1, 2)}
                verdicts.append(verdict(f"{who} student at w={w:g}", rows, scores[own_row(w)]))
    cost = ""
    for method, runs in costs.items():
        per_step = sum(r[0] for r in runs) / len(runs)
        steps, seconds = sum(r[1] for r in runs) / len(runs), sum(r[2] for r in runs) / len(runs)
        cost += (
            f" {method}: a step costs {per_step:.2f}x a teacher training step (wall-clock per optimizer step against "
            f"each seed's teacher race run); {steps:.0f} steps in {seconds:.0f} s per seed"
        )
        pairs = [r[3] for r in runs if r[3] is not None]
        if pairs:
            cost += f", plus {sum(pairs) / len(pairs):.0f} s per teacher to draw its couplings once"
        cost += "."
    return (
        f"# Few-step generation on digit{' latents' if through is not None else 's'}: distilled students against "
        "their teacher\n\n"
        f"`PYTHONPATH=. python bench/bench_few_step.py judge --teachers {shown_path(args.teachers)} --out "
        f"{shown_path(args.out)} --seeds "
        f"{','.join(map(str, args.seeds))} --n {args.n} --methods {','.join(args.methods)} --scales "
        f"{','.join(f'{w:g}' for w in args.scales)} --name {args.name}{spacing_flag(args)}`. Teachers: {describe_teachers(args)}; "
        f"students: {describe_students(args)}. {args.n} balanced "
        f"samples per run, every judge of `difflab.eval.digits_eval.evaluate_samples`, "
        f"{spread(len(args.seeds))}. {describe_spacing(args)}Rows in order of the picture "
        f"(`{args.name}_grid.png`: 20 samples of seed {args.seeds[0]} per row).{cost}\n\n"
        + md_table(header, table)
        + "\n\nTargets (1 step within 2x the teacher's own-sampler FD and 2 steps within 1.3x, in every judge; "
        "accuracy >= 0.99):\n\n"
        + "".join(f"- {v}.\n" for v in verdicts)
        + f"\nMachine: {machine_description()}\n"
        + f"\nThe same scores as a sweep `ablate.py` summarises (arm = sampler row, seeds paired, differences against "
        f"the teacher's own sampler with Holm-adjusted p): {shown_path(ablation)}.\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["all", "train", "judge"])
    p.add_argument("--teachers", type=Path, required=True, help="a directory with difflab_s<seed>/run/checkpoints")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, default=Path("/tmp/difflab_few_step"))
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--methods",
        default="progressive,reflow,consistency,meanflow",
        help="comma-separated: of the default, scm (teachers trained with process.time_scale=1: --teacher-override), "
        "ect and sct (the teacher's weights tuned without it; sct's teachers with process.time_scale=1), guided, "
        "reflow_guided, consistency_guided, and scm_guided (teachers with process.time_scale=1)",
    )
    p.add_argument("--scales", default="1,2,3", help="guidance scales the guided students are judged at")
    p.add_argument("--name", default="few_step", help="result file names: <name>.md, <name>_grid.png, <name>_ablate.md")
    p.add_argument(
        "--spacing",
        type=positive,
        default=None,
        help="the consistency sampler's grid shift for the consistency-family students (sampler.spacing: 2 steps "
        "re-noise at t = s / (1 + s)); default: the process's sampling shift",
    )
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for the distillation runs")
    p.add_argument(
        "--progressive-override",
        action="append",
        default=[],
        help="extra Hydra override for the progressive runs only (progressive, guided): their rounds and rate",
    )
    p.add_argument(
        "--teacher-override",
        action="append",
        default=[],
        help="train missing teachers (the race's difflab side) with this Hydra override",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the same-clock methods (instead of the progressive run's)",
    )
    p.add_argument(
        "--paired-with",
        type=Path,
        default=None,
        help="judge: another --out judged on the same teachers and seeds; adds each row's paired difference to it",
    )
    args = p.parse_args()
    if args.paired_with is not None and args.phase != "train" and not (args.paired_with / "judged").is_dir():
        p.error(f"--paired-with {args.paired_with}: no judged/ folder there (judge that --out first)")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    args.scales = [float(w) for w in args.scales.split(",")]
    set_threads(args.threads)
    if args.phase in ("all", "train"):
        train_phase(args)
    if args.phase in ("all", "judge"):
        text = judge_phase(args)
        if args.paired_with is not None:
            text += paired_section(args.out, args.paired_with)
        print(f"wrote {write_result(args.name, text)}")


if __name__ == "__main__":
    main()
