"""Precision on CPU: one training step of each shipped image recipe's model in fp32 and under bf16 autocast.

This is the measurement behind ``trainer.precision=auto`` on CPUs (``difflab/ops/precision.py``): bf16-mixed is chosen
on a CPU with native bf16 only for models of at least ``CPU_BF16_MIN_PARAMS`` trainable parameters. Each recipe's
DiffusionModule is built from its composed experiment config (the data only supply shapes and class counts), and a
step is the module's training loss (conditioning, noising, denoiser, weighting) + backward + AdamW, the two
precisions alternating every round. The whole-recipe comparison (Lightning loop, EMA, figures) is
``bench/bench_precision.py --recipe``: the digits recipe trained for its steps in each precision, judged by the repo's
digit classifier.

    python bench/bench_precision.py [--quick] [--threads 2] [--recipe]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS as RESULTS_DIR  # noqa: E402
from bench.common import (
    compose_train,
    has_native_bf16,
    interleaved,
    machine_description,
    md_table,
    median,
    set_threads,
    time_calls,
    write_result,
)

# (experiment, batch for the timing; the recipe's own batch where it fits the 2-core machine)
RECIPES = [("digits", 64), ("cifar10_ddim", 8), ("stl10_vpred_cfg", 4)]


def build_module(experiment: str):
    """The recipe's DiffusionModule (and sample shape, classes) without touching its dataset."""
    from hydra.utils import instantiate

    from difflab.pipeline import fill_from_datamodule, trainable_parameters

    cfg = compose_train([f"experiment={experiment}"])
    size = int(cfg.datamodule.get("image_size", 16))
    channels = 1 if experiment.startswith("digits") else 3
    fake = SimpleNamespace(sample_shape=(channels, size, size), num_classes=10, class_names=None, prompts=None)
    fill_from_datamodule(cfg, fake)
    module = instantiate(cfg.model)
    return module, fake.sample_shape, trainable_parameters(module)


def step_fn(module, shape, batch: int, bf16: bool):
    """One training step of the module's own loss in the given precision."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    data = {"x": torch.randn(batch, *shape).clamp(-1, 1), "label": torch.randint(0, 10, (batch,))}
    module.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.diffusion.losses(module, data, drop_conditions=True)["loss"].float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure_steps(args) -> list[list]:
    rows = []
    for experiment, batch in RECIPES[:1] if args.quick else RECIPES:
        torch.manual_seed(0)
        module, shape, params = build_module(experiment)
        fns = {p: step_fn(module, shape, batch, p == "bf16") for p in ("fp32", "bf16")}
        for f in fns.values():
            f()  # warm-up: oneDNN primitive caches for both precisions
        times = interleaved({k: (lambda f=f: time_calls(f, args.steps)) for k, f in fns.items()}, args.repeats)
        fp32, bf16 = median(times["fp32"]), median(times["bf16"])
        rows.append(
            [
                experiment,
                "x".join(map(str, shape)),
                batch,
                f"{params / 1e6:.2f}M",
                f"{fp32 * 1e3:.0f}",
                f"{bf16 * 1e3:.0f}",
                f"{fp32 / bf16:.2f}x",
            ]
        )
        print(rows[-1], flush=True)
    return rows


def run_recipe(precision: str, out: Path, steps: int) -> dict:
    """Train the digits recipe in one precision, then judge 500 samples with the digit classifier."""
    import shutil
    import subprocess

    shutil.rmtree(out, ignore_errors=True)  # a stale last.ckpt in a reused run dir would be judged instead
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "difflab.train",
        f"trainer.precision={precision}",
        f"trainer.max_steps={steps}",
        "trainer.max_time=null",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={out}",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    from difflab.checkpoints import load_checkpoint, module_from_checkpoint
    from difflab.eval.digits_eval import evaluate_module

    ckpt = out / "checkpoints" / "last.ckpt"
    res = evaluate_module(module_from_checkpoint(ckpt), n=500)
    nan = "nan" in (out / "csv" / "metrics.csv").read_text().lower()
    return {
        "wall": wall,
        "fd": res["fd"],
        "acc": res["accuracy"],
        "nan": nan,
        "step": int(load_checkpoint(ckpt)["global_step"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="digits only, 2 steps x 2 rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--recipe", action="store_true", help="also train the digits recipe in fp32 and bf16-mixed")
    p.add_argument("--recipe-steps", type=int, default=2000)
    p.add_argument("--recipe-only", action="store_true", help="skip the per-step timings (keep the earlier table)")
    args = p.parse_args()
    args.steps = args.steps or (2 if args.quick else 5)
    args.repeats = args.repeats or (2 if args.quick else 5)
    set_threads(args.threads)
    from difflab.ops.precision import CPU_BF16_MIN_PARAMS

    previous = (RESULTS_DIR / "precision.md").read_text() if (RESULTS_DIR / "precision.md").is_file() else ""
    if args.recipe_only and "| recipe |" in previous:
        table = previous[previous.index("| recipe |") :].split("\n\n")[0]
    else:
        table = md_table(
            ["recipe", "shape", "batch", "trainable params", "fp32 ms", "bf16 ms", "bf16 speed-up"], measure_steps(args)
        )
    lines = [
        "# Precision on CPU: fp32 vs bf16 autocast" + (" (quick)" if args.quick else ""),
        "",
        f"`python bench/bench_precision.py{' --quick' if args.quick else ''}`: ms per training step of each "
        f"recipe's DiffusionModule (its loss + backward + AdamW), median of {args.repeats} alternating rounds of "
        f"{args.steps} steps, {args.threads} torch threads. Speed-up > 1 means bf16 is faster.",
        "",
        table,
        "",
        f"Rule in `trainer.precision=auto`: bf16-mixed on a native-bf16 CPU from "
        f"{CPU_BF16_MIN_PARAMS / 1e6:.0f}M trainable parameters. This CPU: "
        f"{'native bf16' if has_native_bf16() else 'no native bf16 (auto always picks 32-true here)'}.",
    ]
    if args.recipe:
        recipe_rows = []
        for prec in ("32-true", "bf16-mixed"):
            r = run_recipe(prec, Path(f"/tmp/difflab_bench_precision/{prec}"), args.recipe_steps)
            recipe_rows.append(
                [prec, r["step"], f"{r['wall']:.0f}", f"{r['fd']:.2f}", f"{r['acc']:.3f}", "yes" if r["nan"] else "no"]
            )
            print(recipe_rows[-1], flush=True)
        lines += [
            "",
            f"Whole digits recipe ({args.recipe_steps} steps, then 500 samples judged by the repo's digit "
            "classifier; FD in its features, real-vs-real floor in BENCHMARKS.md):",
            "",
            md_table(["precision", "steps", "wall s (train + figures)", "FD", "accuracy", "NaN in log"], recipe_rows),
        ]
    lines += ["", f"Machine: {machine_description()}"]
    print(write_result("precision", "\n".join(lines), args.quick))


if __name__ == "__main__":
    main()
