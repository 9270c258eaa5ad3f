"""Quality per wall-clock on digits: difflab's default digits recipe vs two plain diffusers training loops.

Every side trains for the same wall-clock budget (default 300 s) with the same number of torch threads, one side
after the other (seed outermost, sides alternating), three seeds per side; then each trained model draws ``--n``
balanced samples (labels i % 10, the sampling noise seeded by the training seed) and every judge of
``difflab.eval.digits_eval.evaluate_samples`` scores them: FD in the repo classifier's features, FD in the second,
independently trained judge's features, FD on raw pixels, k-NN precision / recall in both judges' features and both
judges' accuracy. Means with 95% t-intervals over the seeds; real digits give the floor of each metric.

Sides (peers):
- ``difflab``: ``python train.py`` (the default recipe: configs/train.yaml + experiment=digits) through
  ``difflab.pipeline.train`` with ``trainer.max_time`` = budget and ``trainer.max_steps=-1`` (the LR schedule decays
  over the wall-clock); every default callback stays on. Sampled from its last checkpoint with its own sampler and
  guidance (the recipe as users get it), and the same weights with CFG at the same NFE for the cost comparison.
- ``diffusers_vpred``: ``UNet2DModel`` (block_out_channels (32, 64, 64), attention at the lowest level, 11 class
  embeddings: 10 digits + a null class), ``DDPMScheduler`` squaredcos_cap_v2 with v-prediction, AdamW lr 2e-4,
  ``EMAModel`` 0.999, batch 64, grad clip 1.0, label dropout 0.1; ``DDIMScheduler`` 25 steps, CFG 2.
- ``diffusers_flow``: the same network and optimiser trained as diffusers' SD3 scripts train: times from
  ``compute_density_for_timestep_sampling("logit_normal")`` indexing ``FlowMatchEulerDiscreteScheduler``'s sigmas
  (shift 1), x_t = (1 - sigma) x0 + sigma noise, velocity target noise - x0, ``compute_loss_weighting_for_sd3``;
  ``FlowMatchEulerDiscreteScheduler`` Euler 20 steps, CFG 2.

    PYTHONPATH=. python bench/bench_vs_diffusers.py [--budget 300] [--seeds 0,1,2] [--n 500] [--out DIR] [--quick]

Phases: ``train`` (each side x seed writes ``<out>/<side>_s<seed>/``: samples and timings; difflab also its run
directory), ``judge`` (reads them all, writes the table). The default runs both; a finished side x seed is skipped
when its directory is complete, so an interrupted race resumes. ``resample`` draws the difflab side again with other
guidance / sampler settings. Recipe screens: ``train --sides difflab --out <arm dir> --override key=value ...`` per
arm, then ``screen --arm NAME=<arm dir> ...`` ranks them by a rule that never reads the second judge
(``bench/results/recipe_screen.md``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import QUIET, REPO, machine_description, md_table, set_threads, shown_path, write_result  # noqa: E402

NULL_CLASS = 10
TARGET_RATIO = 0.35  # difflab's FD at most this fraction of the better diffusers loop's, in every feature space
RECALL_GAP = 0.1  # recall within this of the real-data value
MIN_ACCURACY = 0.99  # the repo classifier's accuracy an arm needs to be chosen (and the race's target)
SIDES = ("difflab", "diffusers_vpred", "diffusers_flow")
SAMPLER_OF = {"diffusers_vpred": "DDIM-25, CFG 2", "diffusers_flow": "flow Euler-20, CFG 2"}


def hms(seconds: float) -> str:
    """Lightning's max_time string DD:HH:MM:SS for a number of seconds (rounded to whole seconds)."""
    s = max(1, round(seconds))
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def balanced_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


# ---------------------------------------------------------------------------------------------- difflab side
def train_difflab(budget: float, seed: int, run_dir: Path, extra: list[str]) -> dict:
    """Train the default recipe for ``budget`` seconds through the real config path (the README's `python train.py`)."""
    from hydra import compose, initialize_config_dir

    from difflab.pipeline import train

    overrides = [
        f"seed={seed}",
        f"paths.output_dir={run_dir}",
        f"paths.root_dir={REPO}",
        f"++trainer.max_time='{hms(budget)}'",
        "trainer.max_steps=-1",
        *QUIET,
        *extra,
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    t0, c0 = time.perf_counter(), time.process_time()
    objs = train(cfg)
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    module = objs["model"]
    return {
        "steps": int(objs["trainer"].global_step),
        "train_s": train_s,
        "cpu_s": cpu_s,
        "params": sum(p.numel() for p in module.denoiser.parameters()),
        "guidance": type(module.diffusion.guidance).__name__,
    }


def sample_difflab(
    run_dir: Path, n: int, seed: int, guidance: dict | None = None, rounds: int = 1, sampler: dict | None = None
) -> dict[str, dict]:
    """Samples of a trained difflab run from its last checkpoint: its own guidance (with ``guidance`` overrides, as
    ``sample.py guidance.<key>=...`` gives them; then also the guidance it was trained with), and CFG at scale 2 at
    every noise level (the peers' guidance) at the same NFE; sampling time is the median of ``rounds`` alternating repeats. ``sampler``:
    overrides of the trained sampler's settings (``sample.py sampler.spacing=0.33`` and the like), for every variant."""
    from difflab.diffusion.guidance import CFG
    from difflab.diffusion.system import load_for_sampling

    diffusion, denoiser = load_for_sampling(run_dir / "checkpoints" / "last.ckpt")
    if sampler:
        trained = diffusion.sampler
        diffusion.sampler = functools.partial(trained.func, *trained.args, **{**trained.keywords, **sampler})
    labels = balanced_labels(n)
    own = diffusion.guidance_for(guidance or None)
    variants = {"recipe": own}
    if guidance:  # the guidance the run was trained with, when the overrides changed it
        variants["as_trained"] = diffusion.guidance_for(None)
    if not any(isinstance(g, CFG) and g.scale == 2.0 and not g.interval for g in variants.values()):
        variants["cfg"] = CFG(scale=2.0)
    out: dict[str, dict] = {}
    for _ in range(rounds):  # the variants alternate, so load on the machine hits each alike; median time
        for kind, guidance in variants.items():
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn((n, *diffusion.sample_shape), generator=g)
            s0 = time.perf_counter()
            with torch.no_grad():
                images = diffusion.sample(denoiser, n, labels, guidance=guidance, noise=noise, generator=g)
            seconds = time.perf_counter() - s0
            entry = out.setdefault(
                kind,
                {
                    "images": images.clamp(-1, 1).cpu(),
                    "labels": labels,
                    "times": [],
                    "sampler": describe(diffusion, guidance),
                },
            )
            entry["times"].append(seconds)
    for entry in out.values():
        entry["sample_s"] = statistics.median(entry.pop("times"))
    return out


def describe(diffusion, guidance) -> str:
    """The sampler and guidance of a difflab sample set, e.g. 'heun-10 (grid shift 0.33), CFG 2 in [0.1, 2]'."""

    def band(interval) -> str:
        return f" in {list(interval)}" if interval else ""

    text = f"{diffusion.describe_sampler()}, {type(guidance).__name__} {guidance.scale:g}{band(guidance.interval)}"
    if getattr(guidance, "cfg_scale", None) is not None:  # autoguidance_cfg: CFG's term beside the guide's
        text += f" + CFG {guidance.cfg_scale:g}{band(guidance.cfg_interval)}"
    return text


# ---------------------------------------------------------------------------------------------- diffusers sides
def diffusers_unet():
    """The baseline network: UNet2DModel 16x16x1, widths (32, 64, 64), attention at the lowest level, 11 classes."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
        num_class_embeds=NULL_CLASS + 1,
    )


def vpred_step(unet, scheduler, x0, y):
    """One v-prediction loss (diffusers' train_unconditional / text-to-image scripts with v_prediction)."""
    noise = torch.randn_like(x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],))
    x_t = scheduler.add_noise(x0, noise, t)
    return torch.nn.functional.mse_loss(unet(x_t, t, class_labels=y).sample, scheduler.get_velocity(x0, noise, t))


def flow_step(unet, scheduler, x0, y):
    """One rectified-flow loss as diffusers' SD3 scripts compute it (logit-normal times, velocity target)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    noise = torch.randn_like(x0)
    u = compute_density_for_timestep_sampling("logit_normal", x0.shape[0], logit_mean=0.0, logit_std=1.0)
    idx = (u * scheduler.config.num_train_timesteps).long()
    t = scheduler.timesteps[idx]
    sigma = scheduler.sigmas[idx].reshape(-1, 1, 1, 1)
    x_t = (1.0 - sigma) * x0 + sigma * noise
    weight = compute_loss_weighting_for_sd3("logit_normal", sigma)
    pred = unet(x_t, t, class_labels=y).sample
    return (weight * (pred - (noise - x0)) ** 2).mean()


@torch.no_grad()
def sample_diffusers(unet, sample_scheduler, labels, steps: int, scale: float, seed: int, batch: int = 250):
    """Guided sampling with a diffusers scheduler: out = u + scale (c - u), the null class as u."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(labels), 1, 16, 16), generator=g)
    unet.eval()
    out = []
    for i in range(0, len(labels), batch):
        y = labels[i : i + batch]
        x = noise[i : i + batch] * getattr(sample_scheduler, "init_noise_sigma", 1.0)
        sample_scheduler.set_timesteps(steps)
        both = torch.cat([y, torch.full_like(y, NULL_CLASS)])
        for t in sample_scheduler.timesteps:
            c, u = unet(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
            x = sample_scheduler.step(u + scale * (c - u), t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def run_diffusers(side: str, budget: float, n: int, seed: int) -> tuple[dict, dict[str, dict]]:
    """Train a plain diffusers loop for ``budget`` seconds of wall-clock, then sample it with its scheduler + CFG 2."""
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import EMAModel

    from difflab.datamodules.digits import DigitsDataModule

    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    dm = DigitsDataModule(image_size=16, batch_size=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    unet = diffusers_unet()
    if side == "diffusers_vpred":
        scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
        )
        loss_fn, sampler, steps = vpred_step, DDIMScheduler.from_config(scheduler.config), 25
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        loss_fn, sampler, steps = flow_step, FlowMatchEulerDiscreteScheduler.from_config(scheduler.config), 20
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-4)
    ema = EMAModel(unet.parameters(), decay=0.999)
    n_steps, start, done = 0, time.perf_counter(), False
    while not done:
        for batch in loader:
            x0, y = batch["x"], batch["label"]
            y = torch.where(torch.rand(y.shape) < 0.1, torch.full_like(y, NULL_CLASS), y)
            loss = loss_fn(unet, scheduler, x0, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            ema.step(unet.parameters())
            n_steps += 1
            if time.perf_counter() - start >= budget:
                done = True
                break
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    ema.copy_to(unet.parameters())
    labels = balanced_labels(n)
    s0 = time.perf_counter()
    images = sample_diffusers(unet, sampler, labels, steps=steps, scale=2.0, seed=seed)
    meta = {
        "steps": n_steps,
        "train_s": train_s,
        "cpu_s": cpu_s,
        "params": sum(p.numel() for p in unet.parameters()),
    }
    sample = {"images": images, "labels": labels, "sample_s": time.perf_counter() - s0, "sampler": SAMPLER_OF[side]}
    return meta, {"recipe": sample}


# ---------------------------------------------------------------------------------------------- phases
def side_dir(out: Path, side: str, seed: int) -> Path:
    return out / f"{side}_s{seed}"


def run_child(args) -> None:
    """Train and sample one side x seed into its directory (a separate process per side, so nothing is shared)."""
    d = side_dir(args.out, args.child, args.seed)
    d.mkdir(parents=True, exist_ok=True)
    if args.child == "difflab":
        meta = train_difflab(args.budget, args.seed, d / "run", args.override)
        samples = sample_difflab(d / "run", args.n, args.seed)
    else:
        meta, samples = run_diffusers(args.child, args.budget, args.n, args.seed)
    meta.update(side=args.child, seed=args.seed, budget=args.budget, threads=torch.get_num_threads())
    if args.child == "difflab":
        meta["overrides"] = list(args.override)  # [] : the recipe as it is
    meta["machine"] = machine_description()
    for kind, s in samples.items():
        torch.save({"images": s.pop("images"), "labels": s.pop("labels")}, d / f"samples_{kind}.pt")
    meta["samples"] = samples
    (d / "meta.json").write_text(json.dumps(meta, indent=2))


def resample_phase(args) -> None:
    """Draw the difflab side's samples again from its runs' last checkpoints with ``--guidance key=value``
    overrides of the recipe's guidance and ``--sampler key=value`` of its sampler (the sweeps' choice, without
    training again: neither changes training). ``{seed}`` in a value is each run's seed (a guide per run:
    ``--guidance guide_ckpt=<guides>/s{seed}/f0.35.ckpt``)."""
    import yaml

    overrides = {k: yaml.safe_load(v) for k, _, v in (g.partition("=") for g in args.guidance)}
    sampler = {k: yaml.safe_load(v) for k, _, v in (g.partition("=") for g in args.sampler)}
    for seed in args.seeds:
        d = side_dir(args.out, "difflab", seed)
        meta = json.loads((d / "meta.json").read_text())
        seeded = {k: v.format(seed=seed) if isinstance(v, str) else v for k, v in overrides.items()}
        samples = sample_difflab(d / "run", args.n, seed, seeded, rounds=3, sampler=sampler)
        for kind, sample in samples.items():
            torch.save({"images": sample.pop("images"), "labels": sample.pop("labels")}, d / f"samples_{kind}.pt")
        meta.update(samples=samples, resampled_with={**overrides, **{f"sampler.{k}": v for k, v in sampler.items()}})
        (d / "meta.json").write_text(json.dumps(meta, indent=2))
        print(f"[race] difflab seed {seed}: sampled again with {seeded} {sampler}")


def train_phase(args) -> None:
    for seed in args.seeds:
        for side in args.sides:
            if (side_dir(args.out, side, seed) / "meta.json").is_file():
                print(f"[race] {side} seed {seed}: done already, skipped")
                continue
            print(f"[race] {side} seed {seed}: training for {args.budget:g} s", flush=True)
            cmd = [sys.executable, __file__, "--child", side, "--seed", str(seed), "--budget", str(args.budget)]
            cmd += ["--n", str(args.n), "--threads", str(args.threads), "--out", str(args.out)]
            for o in args.override:
                cmd += ["--override", o]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
            if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
                sys.exit(f"bench_vs_diffusers: {side} seed {seed} failed (see its output above)")


METRICS = [  # key, column, lower is better
    ("fd", "FD classifier", True),
    ("fd_judge2", "FD judge 2", True),
    ("fd_pixel", "FD pixels", True),
    ("precision_judge2", "precision (j2)", False),
    ("recall_judge2", "recall (j2)", False),
    ("precision", "precision (clf)", False),
    ("recall", "recall (clf)", False),
    ("accuracy", "accuracy (clf)", False),
    ("accuracy_judge2", "accuracy (j2)", False),
]


def fmt(iv, digits: int) -> str:
    if iv.n < 2:
        return f"{iv.mean:.{digits}f}"
    return f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def difflab_cost(args, scores: dict) -> str:
    """What the recipe's guidance costs: sampling time against CFG at every level at the same NFE, and with the kept
    guide its checkpoint disk."""
    from difflab.ablation.stats import mean_ci
    from difflab.checkpoints import KEPT_GUIDE_KEY, load_checkpoint

    guided = next(
        (
            k
            for k in ("recipe", "as_trained")
            if "Autoguidance" in scores.get(("difflab", k), [{}])[0].get("sampler", "")
        ),
        None,
    )
    if guided is None:  # the recipe guides with CFG (in a band or not): its time against CFG at every level
        pairs = zip(scores[("difflab", "recipe")], scores[("difflab", "cfg")])
        ratio = mean_ci([a["sample_s"] / b["sample_s"] for a, b in pairs])
        return (
            f"Sampling time of the recipe's guidance: {ratio.mean:.2f}x CFG's at every noise level at the same NFE (mean "
            "over seeds of the per-seed ratio)."
        )
    pairs = zip(scores[("difflab", guided)], scores[("difflab", "cfg")])
    ratio = mean_ci([a["sample_s"] / b["sample_s"] for a, b in pairs])
    kept, sizes, steps = [], [], []
    for seed in args.seeds:
        last = side_dir(args.out, "difflab", seed) / "run" / "checkpoints" / "last.ckpt"
        ckpt = load_checkpoint(last)
        state = ckpt.get(KEPT_GUIDE_KEY)
        if state is not None:
            kept.append(sum(t.numel() * t.element_size() for t in state["state_dict"].values()))
            steps.append(f"{state['step']} of {ckpt['global_step']}")
        sizes.append(last.stat().st_size)
    disk = (
        f"the kept guide adds {mean_ci(kept).mean / 1e6:.2f} MB to each checkpoint ({100 * mean_ci(kept).mean / (mean_ci(sizes).mean - mean_ci(kept).mean):.0f}% "
        f"of a checkpoint without it; kept at step {', '.join(steps)})"
        if kept
        else "no kept guide in these checkpoints"
    )
    return (
        f"Cost of the recipe's guidance ({scores[('difflab', guided)][0]['sampler']}): sampling time {ratio.mean:.2f}x "
        "CFG's at every noise level with the same sampler steps (mean over seeds of the per-seed ratio); "
        f"{disk}."
    )


def judge_phase(args) -> str:
    from difflab.ablation.stats import mean_ci
    from difflab.eval.digits_eval import evaluate_samples, real_floor_metrics

    scores: dict[tuple[str, str], list[dict]] = {}
    metas: dict[str, list[dict]] = {}
    for side in args.sides:
        for seed in args.seeds:
            d = side_dir(args.out, side, seed)
            meta = json.loads((d / "meta.json").read_text())
            metas.setdefault(side, []).append(meta)
            for kind, s in meta["samples"].items():
                data = torch.load(d / f"samples_{kind}.pt", weights_only=True)
                res = evaluate_samples(data["images"], data["labels"])
                res.update(sample_s=s["sample_s"], sampler=s["sampler"])
                scores.setdefault((side, kind), []).append(res)
                print(f"[race] judged {side} seed {seed} {kind}: FD {res['fd']:.2f}, judge 2 {res['fd_judge2']:.2f}")
    real = real_floor_metrics(args.n)
    header = ["side", "sampling", "steps in budget", *[m[1] for m in METRICS], "sampling s"]
    rows, means = [], {}
    for (side, kind), rs in scores.items():
        cis = {k: mean_ci([r[k] for r in rs]) for k, _, _ in METRICS}
        means[(side, kind)] = {k: v.mean for k, v in cis.items()}
        steps = mean_ci([m["steps"] for m in metas[side]])
        digits = {"fd": 2, "fd_judge2": 2, "fd_pixel": 3}
        rows.append(
            [
                side,
                rs[0]["sampler"],
                f"{steps.mean:.0f}",
                *[fmt(cis[k], digits.get(k, 3)) for k, _, _ in METRICS],
                f"{mean_ci([r['sample_s'] for r in rs]).mean:.1f}",
            ]
        )
    rows.append(
        ["real digits", f"{args.n} of 1797", "", *[f"{real[k]:.3g}" if k in real else "" for k, _, _ in METRICS], ""]
    )
    mine = means[("difflab", "recipe")]
    peers = [v for (s, _), v in means.items() if s != "difflab"]
    ok = bool(peers)  # no peer judged: no verdict
    verdict = []
    for key in ("fd", "fd_judge2", "fd_pixel") if peers else ():
        best = min(p[key] for p in peers)
        ratio = mine[key] / best
        ok &= ratio <= TARGET_RATIO
        verdict.append(f"{key} {ratio:.2f}x the better diffusers loop")
    for key in ("recall", "recall_judge2"):
        gap = real[key] - mine[key]
        ok &= gap <= RECALL_GAP
        verdict.append(f"{key} {mine[key]:.3f} vs real {real[key]:.3f}")
    ok &= min(mine["accuracy"], mine["accuracy_judge2"]) >= MIN_ACCURACY
    verdict.append(f"accuracy {mine['accuracy']:.3f} / {mine['accuracy_judge2']:.3f}")
    cost = difflab_cost(args, scores) if ("difflab", "cfg") in scores else ""
    seeds = ",".join(map(str, args.seeds))
    overrides = sorted({" ".join(m.get("overrides", [])) for m in metas.get("difflab", [])} - {""})
    arm = f" The difflab side trained with `{'`, `'.join(overrides)}`." if overrides else ""
    return "\n".join(
        [
            "# Quality per wall-clock on digits: difflab's default recipe vs two diffusers loops, every judge"
            + (" (quick)" if args.quick else ""),
            "",
            f"`PYTHONPATH=. python bench/bench_vs_diffusers.py --budget {args.budget:g} --seeds {seeds} --n {args.n} "
            f"--out {shown_path(args.out)}`: each side x seed trained for {args.budget:g} s of wall-clock with "
            f"{args.threads} torch threads, one after the other (seed outermost); {args.n} balanced samples per run, "
            f"judged by every judge of `difflab.eval.digits_eval.evaluate_samples`. Means over {len(args.seeds)} seeds "
            "with 95% t-intervals. FD to all 1797 real digits; precision / recall (k=3) against a fixed half of the "
            "real digits; judge 2 is the independently trained LeNet-style classifier (never used for a decision)."
            + arm,
            "",
            md_table(header, rows),
            "",
            f"Targets (FD <= {TARGET_RATIO}x the better diffusers loop in every feature space, recall within "
            f"{RECALL_GAP} of real, accuracy >= {MIN_ACCURACY}): {'met' if ok else 'not met'}: "
            + "; ".join(verdict)
            + ".",
            "",
            cost,
            "",
            f"Machine: {metas['difflab'][0]['machine'] if 'difflab' in metas else machine_description()}",
        ]
    )


def flow_loop_means(race: Path) -> dict[str, float]:
    """The flow loop's mean FD per feature space over the seeds of ``race`` (the rule's yardstick)."""
    from difflab.eval.digits_eval import evaluate_samples

    runs = sorted(race.glob("diffusers_flow_s*/samples_recipe.pt"))
    if not runs:
        sys.exit(f"bench_vs_diffusers: no diffusers_flow runs under {race}: train that side first")
    scores = [evaluate_samples(**torch.load(r, weights_only=True)) for r in runs]
    return {k: statistics.mean(s[k] for s in scores) for k in ("fd", "fd_pixel", "fd_judge2")}


def rule_score(fd: float, fd_pixel: float, peer: dict[str, float]) -> float:
    """The rule every recipe and guidance choice is ranked by, fixed before any of them ran: the sum of the repo
    classifier's and the pixels' FD ratios to the flow loop (lower is better; arms below ``MIN_ACCURACY`` are out).
    The second judge is never read by it."""
    return fd / peer["fd"] + fd_pixel / peer["fd_pixel"]


def screen_phase(args) -> str:
    """Arms of the difflab recipe (each ``--arm NAME=DIR``: a directory of difflab runs this script trained with
    ``--override``), judged like the race and ranked by the rule fixed before they ran: among arms run at every seed
    of the most-seeded arm whose repo-classifier accuracy is >= 0.99, the lowest sum of the classifier-FD and
    pixel-FD ratios to the flow loop of ``--out``'s race (one-seed arms are first-round probes). The second judge
    is reported, never read by the rule."""
    from difflab.ablation.stats import mean_ci
    from difflab.eval.digits_eval import evaluate_samples

    def judged(directory: Path, side: str, kind: str) -> tuple[list[dict], list[dict]]:
        runs = sorted(directory.glob(f"{side}_s*/meta.json"))
        metas = [json.loads(m.read_text()) for m in runs]
        data = [torch.load(m.parent / f"samples_{kind}.pt", weights_only=True) for m in runs]
        return metas, [evaluate_samples(d["images"], d["labels"]) for d in data]

    peer = flow_loop_means(args.out)
    header = [
        "arm",
        "overrides",
        "seeds",
        "steps",
        "FD classifier",
        "FD pixels",
        "accuracy (clf)",
        "rule score",
        "FD judge 2",
    ]
    rows, scores = [], {}
    judged_arms = {name: judged(Path(d), "difflab", "recipe") for name, d in (a.split("=", 1) for a in args.arm)}
    full = max(len(rs) for _, rs in judged_arms.values())
    for name, (metas, rs) in judged_arms.items():
        cis = {k: mean_ci([r[k] for r in rs]) for k in ("fd", "fd_pixel", "accuracy", "fd_judge2")}
        score = rule_score(cis["fd"].mean, cis["fd_pixel"].mean, peer)
        if cis["accuracy"].mean >= MIN_ACCURACY and len(rs) == full:
            scores[name] = score
        recorded = metas[0].get("overrides")
        overrides = " ".join(recorded) if recorded else "(none)" if recorded is not None else "(not recorded)"
        steps = f"{statistics.mean(m['steps'] for m in metas):.0f}"
        rows.append([name, f"`{overrides}`", ",".join(str(m["seed"]) for m in metas), steps])
        rows[-1] += [fmt(cis["fd"], 2), fmt(cis["fd_pixel"], 3), fmt(cis["accuracy"], 3), f"{score:.4f}"]
        rows[-1] += [fmt(cis["fd_judge2"], 2)]
    best = min(scores, key=scores.get) if scores else "none"
    paired = paired_table(judged_arms, args.paired) if args.paired else []
    budgets = "/".join(sorted({f"{m['budget']:g}" for metas, _ in judged_arms.values() for m in metas}))
    return "\n".join(
        [
            "# Recipe screen: which training settings give the best model in the race's budget",
            "",
            f"`PYTHONPATH=. python bench/bench_vs_diffusers.py screen --out {shown_path(args.out)} "
            + " ".join(f"--arm {a.split('=', 1)[0]}=<dir>" for a in args.arm)
            + ("" if args.name == "recipe_screen" else f" --name {args.name}")
            + (f" --paired {args.paired}" if args.paired else "")
            + "`: each arm's runs trained by `bench_vs_diffusers.py train --sides difflab --override ...` "
            f"({budgets} s each, one "
            "after the other), sampled with the recipe's sampler and guidance; "
            f"{args.n} samples per run, means with 95% t-intervals over the seeds. Rule score: classifier FD / "
            f"{peer['fd']:.2f} + pixel FD / {peer['fd_pixel']:.3f} (the flow loop's means in the race of "
            "`--out`), among arms run at every seed with classifier accuracy >= 0.99. The second judge's FD (flow loop "
            f"{peer['fd_judge2']:.2f}) is reported, never used by the rule.",
            "",
            md_table(header, rows),
            "",
            f"Lowest rule score: **{best}**.",
            "",
            *paired,
            f"Machine: {machine_description()}",
        ]
    )


PAIRED_KEYS = [
    ("fd", "FD classifier", 2),
    ("fd_judge2", "FD judge 2", 2),
    ("fd_pixel", "FD pixels", 3),
    ("recall", "recall (clf)", 3),
    ("recall_judge2", "recall (j2)", 3),
    ("accuracy", "accuracy (clf)", 3),
]


def paired_table(judged_arms: dict[str, tuple[list[dict], list[dict]]], base: str) -> list[str]:
    """Each arm minus ``base`` at the same seed (means with 95% t-intervals over the seeds both ran): the paired
    difference, tighter than two separate intervals when the seeds share their data order and noise."""
    from difflab.ablation.stats import mean_ci

    if base not in judged_arms:
        sys.exit(f"--paired {base}: no such --arm (have {', '.join(judged_arms)})")
    by_seed = {name: {m["seed"]: r for m, r in zip(*arm)} for name, arm in judged_arms.items()}
    rows = []
    for name, runs in by_seed.items():
        seeds = sorted(set(runs) & set(by_seed[base]))
        if name == base or not seeds:
            continue
        diffs = {k: mean_ci([runs[s][k] - by_seed[base][s][k] for s in seeds]) for k, _, _ in PAIRED_KEYS}
        rows.append([name, ",".join(map(str, seeds)), *(fmt(diffs[k], d) for k, _, d in PAIRED_KEYS)])
    header = ["arm", "seeds", *(f"{label} - {base}" for _, label, _ in PAIRED_KEYS)]
    return [f"Paired against `{base}` (same seed):", "", md_table(header, rows), ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", nargs="?", choices=["all", "train", "resample", "judge", "screen"], default="all")
    p.add_argument("--budget", type=float, default=None, help="training wall-clock seconds per run (300; 20 --quick)")
    p.add_argument("--n", type=int, default=None, help="samples per run (500; 100 with --quick)")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (0,1,2; 0 with --quick)")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--out", type=Path, default=None, help="where runs and samples go (/tmp/difflab_race[_quick])")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for the difflab side")
    p.add_argument("--guidance", action="append", default=[], help="resample: a guidance override key=value")
    p.add_argument("--sampler", action="append", default=[], help="resample: a sampler override key=value")
    p.add_argument("--quick", action="store_true", help="20 s budget, 100 samples, one seed")
    p.add_argument(
        "--arm", action="append", default=[], help="screen: NAME=DIR of difflab runs trained with --override"
    )
    p.add_argument("--name", default="recipe_screen", help="screen: the result file's name in bench/results")
    p.add_argument(
        "--paired", default=None, help="screen: an --arm NAME every other arm is compared with, seed by seed"
    )
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out = args.out or Path("/tmp/difflab_race" + ("_quick" if args.quick else ""))
    args.budget = args.budget or (20.0 if args.quick else 300.0)
    args.n = args.n or (100 if args.quick else 500)
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    args.sides = [s for s in args.sides.split(",") if s]
    unknown = set(args.sides) - set(SIDES)
    if unknown:
        p.error(f"--sides: unknown {sorted(unknown)}; choose from {', '.join(SIDES)}")
    arm_names = [a.split("=", 1)[0] for a in args.arm]
    if args.paired and args.paired not in arm_names:
        p.error(f"--paired {args.paired}: no such --arm (have {', '.join(arm_names) or 'none'})")
    set_threads(args.threads)
    if args.child:
        run_child(args)
        return
    if args.phase in ("all", "train"):
        train_phase(args)
    if args.phase == "resample":
        resample_phase(args)
    if args.phase in ("all", "judge"):
        text = judge_phase(args)
        print(text)
        print("wrote", write_result("vs_diffusers", text, args.quick))
    if args.phase == "screen":
        text = screen_phase(args)
        print(text)
        print("wrote", write_result(args.name, text, args.quick))


if __name__ == "__main__":
    main()
