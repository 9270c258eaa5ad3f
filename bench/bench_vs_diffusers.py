"""Quality per wall-clock on digits: difflab's default digits recipe vs a plain PyTorch loop on diffusers.

Both sides train for the same wall-clock budget (default 300 s) with the same number of torch threads, then sample
``--n`` balanced images (labels i % 10) which the repo's digit classifier judges: accuracy against the requested label
and FD (Frechet distance in its 128-d features) to all 1797 real digits. FD of ``--n`` real digits is the floor.

- difflab: ``configs/train.yaml`` + ``experiment=digits`` composed by Hydra and run through ``difflab.pipeline.train``
  with ``trainer.max_time`` = budget and ``trainer.max_steps=-1``, so the learning-rate schedule decays over the
  wall-clock budget and the run uses all of it (every default callback, logger and validation stays on; only the
  progress bar is removed). Samples come from the EMA module with the recipe's sampler, and also with DDIM-25 (the diffusers side's
  sampler) for a like-for-like row.
- diffusers: ``UNet2DModel`` (block_out_channels (32, 64, 64), attention at the lowest resolution, 11 class
  embeddings: 10 digits + a null class), ``DDPMScheduler`` squaredcos_cap_v2 with v-prediction, AdamW lr 2e-4,
  ``EMAModel`` 0.999, batch 64, grad clip 1.0, label dropout 0.1; then ``DDIMScheduler`` 25 steps with CFG scale 2.

By default the two sides run at the same time in two processes with one thread each (so load from other jobs hits
both alike; CPU seconds used are reported to show it); ``--sequential`` runs them one after the other.

    PYTHONPATH=. python bench/bench_vs_diffusers.py [--budget 300] [--n 500] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, machine_description, md_table, set_threads, write_result  # noqa: E402

NULL_CLASS = 10
TARGET_RATIO = 0.35  # difflab's FD at most this fraction of the diffusers loop's (issue #14)


# ---------------------------------------------------------------------------------------------- difflab side
def hms(seconds: float) -> str:
    """Lightning's max_time string DD:HH:MM:SS for a number of seconds (rounded to whole seconds)."""
    s = max(1, round(seconds))
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_difflab(budget: float, n: int, out_dir: Path, extra: list[str]) -> dict:
    """Train the default digits recipe for ``budget`` seconds through the real config path, then sample and judge."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from difflab.callbacks.ema import ema_module
    from difflab.diffusion.samplers import ddim, sampler_name
    from difflab.eval.digits_eval import evaluate_module
    from difflab.pipeline import train

    overrides = [
        "experiment=digits",
        f"paths.output_dir={out_dir}",
        f"paths.root_dir={REPO}",
        f"++trainer.max_time='{hms(budget)}'",
        "trainer.max_steps=-1",
        "~callbacks.progress_bar",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    t0 = time.perf_counter()
    c0 = time.process_time()
    objs = train(cfg)
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    trainer, model = objs["trainer"], objs["model"]
    module = ema_module(trainer, model)
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    rows = []
    samplers = [("recipe", None)]
    if sampler_name(module.diffusion.sampler) != "ddim-25" or module.diffusion.sampler.keywords.get("eta", 0.0) != 0.0:
        samplers.append(("ddim25", functools.partial(ddim, steps=25, eta=0.0)))  # the diffusers side's sampler
    for label, sampler in samplers:
        s0 = time.perf_counter()
        ev = evaluate_module(module, n=n, sampler=sampler, batch_size=250)
        rows.append(
            {
                "sampler": sampler_name(sampler or module.diffusion.sampler),
                "accuracy": ev["accuracy"],
                "fd": ev["fd"],
                "sample_s": time.perf_counter() - s0,
                "kind": label,
            }
        )
    return {
        "side": "difflab",
        "steps": int(trainer.global_step),
        "train_s": train_s,
        "cpu_s": cpu_s,
        "params": sum(p.numel() for p in module.denoiser.parameters()),
        "recipe": {
            "net": {k: v for k, v in net.items() if not k.startswith("_")},
            "lr": float(cfg.model.lr),
            "weight_decay": float(cfg.optimizer.weight_decay),
            "max_steps": int(cfg.trainer.max_steps),
            "batch_size": int(cfg.datamodule.batch_size),
            "guidance": float(cfg.guidance.scale),
            "p_uncond": float(cfg.model.diffusion.p_uncond),
            "ema": float(cfg.callbacks.ema.decay),
        },
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------- diffusers side
def diffusers_unet(layers_per_block: int = 2):
    """The baseline network: UNet2DModel 16x16x1, widths (32, 64, 64), attention at the lowest level, 11 classes."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
        num_class_embeds=NULL_CLASS + 1,
    )


@torch.no_grad()
def diffusers_sample(
    unet, train_scheduler, labels: torch.Tensor, steps: int, scale: float, seed: int, batch_size: int = 250
) -> torch.Tensor:
    """DDIM (eta 0) samples with classifier-free guidance: out = u + scale (c - u), the null class as u."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(train_scheduler.config)
    g = torch.Generator().manual_seed(seed)
    out = []
    unet.eval()
    for i in range(0, len(labels), batch_size):
        y = labels[i : i + batch_size]
        x = torch.randn((len(y), 1, 16, 16), generator=g)
        sched.set_timesteps(steps)
        both = torch.cat([y, torch.full_like(y, NULL_CLASS)])
        for t in sched.timesteps:
            pred = unet(torch.cat([x, x]), t, class_labels=both).sample
            c, u = pred.chunk(2)
            x = sched.step(u + scale * (c - u), t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def run_diffusers(budget: float, n: int, layers_per_block: int, seed: int = 42) -> dict:
    """Train the plain diffusers loop for ``budget`` seconds of wall-clock, then sample with DDIM-25 + CFG 2."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from difflab.datamodules.digits import DigitsDataModule
    from difflab.eval.digits_eval import evaluate_samples

    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    dm = DigitsDataModule(image_size=16, batch_size=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    unet = diffusers_unet(layers_per_block)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-4)
    ema = EMAModel(unet.parameters(), decay=0.999)
    steps = 0
    start = time.perf_counter()
    done = False
    while not done:
        for batch in loader:
            x0, y = batch["x"], batch["label"]
            y = torch.where(torch.rand(y.shape) < 0.1, torch.full_like(y, NULL_CLASS), y)
            noise = torch.randn_like(x0)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],))
            x_t = scheduler.add_noise(x0, noise, t)
            target = scheduler.get_velocity(x0, noise, t)
            loss = torch.nn.functional.mse_loss(unet(x_t, t, class_labels=y).sample, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            ema.step(unet.parameters())
            steps += 1
            if time.perf_counter() - start >= budget:
                done = True
                break
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    ema.copy_to(unet.parameters())
    labels = torch.arange(n) % 10
    s0 = time.perf_counter()
    images = diffusers_sample(unet, scheduler, labels, steps=25, scale=2.0, seed=0)
    ev = evaluate_samples(images, labels)
    return {
        "side": "diffusers",
        "steps": steps,
        "train_s": train_s,
        "cpu_s": cpu_s,
        "params": sum(p.numel() for p in unet.parameters()),
        "rows": [
            {
                "sampler": "DDIM-25 (DDIMScheduler)",
                "accuracy": ev["accuracy"],
                "fd": ev["fd"],
                "sample_s": time.perf_counter() - s0,
                "kind": "ddim25",
            }
        ],
    }


# ---------------------------------------------------------------------------------------------- driver
def real_floor(n: int) -> float:
    """FD of n real digits (a random subset) to all real digits: what a perfect generator would score."""
    from difflab.eval.digits_eval import fd_to_real, real_digit_features

    return fd_to_real(real_digit_features(n=n, seed=0))


def spawn(side: str, args, out_json: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--budget",
        str(args.budget),
        "--n",
        str(args.n),
        "--threads",
        str(args.threads),
        "--json",
        str(out_json),
        "--diffusers-layers",
        str(args.diffusers_layers),
    ]
    for o in args.override:
        cmd += ["--override", o]
    return subprocess.Popen(cmd, cwd=REPO, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


def report(res: dict, floor: float, args) -> str:
    dl, df = res["difflab"], res["diffusers"]
    base_fd = df["rows"][0]["fd"]
    rows = []
    for side in (dl, df):
        for r in side["rows"]:
            rows.append(
                [
                    side["side"],
                    f"{side['params'] / 1e6:.2f}M",
                    side["steps"],
                    f"{side['steps'] / args.budget:.2f}",
                    f"{side['cpu_s']:.0f}",
                    r["sampler"],
                    f"{r['accuracy']:.3f}",
                    f"{r['fd']:.2f}",
                    f"{r['fd'] / base_fd:.2f}",
                    f"{r['sample_s']:.0f}",
                ]
            )
    rows.append([f"real digits ({args.n})", "", "", "", "", "", "", f"{floor:.2f}", f"{floor / base_fd:.2f}", ""])
    rec = dl["recipe"]
    best = min(dl["rows"], key=lambda r: r["fd"])
    recipe_row = dl["rows"][0]
    met = recipe_row["fd"] <= TARGET_RATIO * base_fd and recipe_row["accuracy"] >= 0.99
    return "\n".join(
        [
            "# Quality per wall-clock on digits: difflab vs a plain diffusers loop"
            + (" (quick)" if args.quick else ""),
            "",
            f"`PYTHONPATH=. python bench/bench_vs_diffusers.py --budget {args.budget:g} --n {args.n}`"
            f"{' --sequential' if args.sequential else ''}; each side trained for {args.budget:g} s of wall-clock with "
            f"{args.threads} torch thread(s), {'one after the other' if args.sequential else 'both at the same time (one process each)'}; "
            f"{args.n} balanced samples judged by the digit classifier (FD to all 1797 real digits).",
            "",
            md_table(
                [
                    "side",
                    "params",
                    "optimizer steps",
                    "steps/s",
                    "CPU s (train)",
                    "sampler",
                    "accuracy",
                    "FD",
                    "FD / diffusers FD",
                    "sampling s",
                ],
                rows,
            ),
            "",
            f"difflab recipe as run: net {rec['net']}, lr {rec['lr']:g}, weight decay {rec['weight_decay']:g}, "
            f"max_steps {rec['max_steps']} (-1: bounded by the time budget alone; warm-up + cosine LR over the wall-clock), "
            f"batch {rec['batch_size']}, p_uncond {rec['p_uncond']}, guidance {rec['guidance']}, EMA {rec['ema']}. "
            f"diffusers: UNet2DModel layers_per_block {args.diffusers_layers}, AdamW lr 2e-4 (weight decay 0.01, torch's "
            f"default), no LR schedule. difflab's budget includes its validation, sample-grid and checkpoint callbacks.",
            "",
            f"Target (difflab recipe FD <= {TARGET_RATIO} x diffusers FD with accuracy >= 0.99): "
            f"{'met' if met else 'not met'} (recipe sampler: FD ratio {recipe_row['fd'] / base_fd:.2f}, accuracy "
            f"{recipe_row['accuracy']:.3f}; best difflab row {best['sampler']}: ratio {best['fd'] / base_fd:.2f}).",
            "",
            f"Machine: {machine_description()}",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=None, help="training wall-clock seconds per side (300; 30 --quick)")
    p.add_argument("--n", type=int, default=None, help="samples per side (500; 100 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per side")
    p.add_argument("--sequential", action="store_true", help="train one side after the other instead of together")
    p.add_argument(
        "--diffusers-layers", type=int, default=2, help="UNet2DModel layers_per_block (diffusers' default 2)"
    )
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for the difflab side")
    p.add_argument("--quick", action="store_true", help="30 s budget, 100 samples")
    p.add_argument("--child", choices=["difflab", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.budget = args.budget or (30.0 if args.quick else 300.0)
    args.n = args.n or (100 if args.quick else 500)
    set_threads(args.threads)
    if args.child:
        if args.child == "difflab":
            with tempfile.TemporaryDirectory(prefix="difflab_bench_") as d:
                res = run_difflab(args.budget, args.n, Path(d), args.override)
        else:
            res = run_diffusers(args.budget, args.n, args.diffusers_layers)
        args.json.write_text(json.dumps(res))
        return
    with tempfile.TemporaryDirectory(prefix="bench_vs_diffusers_") as d:
        outs = {s: Path(d) / f"{s}.json" for s in ("difflab", "diffusers")}
        if args.sequential:
            for s in outs:
                if spawn(s, args, outs[s]).wait() != 0:
                    sys.exit(f"bench_vs_diffusers: the {s} side failed (see its output above)")
        else:
            procs = {s: spawn(s, args, outs[s]) for s in outs}
            failed = [s for s, pr in procs.items() if pr.wait() != 0]
            if failed:
                sys.exit(f"bench_vs_diffusers: the {failed} side(s) failed (see the output above)")
        res = {s: json.loads(outs[s].read_text()) for s in outs}
    text = report(res, real_floor(args.n), args)
    print(text)
    print("wrote", write_result("vs_diffusers", text, args.quick))


if __name__ == "__main__":
    main()
