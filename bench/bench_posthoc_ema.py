"""Post-hoc EMA on digits: one training run, then FD and accuracy against the relative EMA length, next to the
fixed-decay EMA; and the cost of the snapshots (disk and time per 1000 steps) for the digits and STL10 recipes.

    python bench/bench_posthoc_ema.py [--run-dir RUN] [--n 500] [--quick]

Without ``--run-dir`` it trains the digits recipe (``experiment=digits callbacks=posthoc``: the default EMA with decay
0.999 plus snapshots of the power-function EMAs sigma_rel 0.05 and 0.10 every 150 steps). Each sigma_rel of
``--sigma-rels`` is reconstructed at the final snapshot by ``difflab.reconstruct_ema.reconstruct_weights`` (what
``reconstruct_ema.py`` writes), loaded into the run's model and judged like every digits number here: ``--n``
balanced samples with the recipe's sampler and guidance and the same initial noise, FD in the repo's digit
classifier's features to the 1797 real digits, accuracy by the same classifier. Writes
``bench/results/posthoc_ema.md`` and ``bench/results/posthoc_ema.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (
    QUIET,
    RESULTS,
    compose_train,
    machine_description,
    md_table,
    median,
    set_threads,
    write_result,  # noqa: E402
)

SIGMA_RELS = (0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.17, 0.22)
QUIET_CSV = [*QUIET, "logger=csv"]


def train_run(out: Path, extra: list[str]) -> Path:
    """The digits recipe with post-hoc EMA snapshots; returns the run directory."""
    from difflab.pipeline import train

    train(compose_train(["experiment=digits", "callbacks=posthoc", *QUIET_CSV, *extra], output_dir=out))
    return out


def judge(module, n: int) -> dict:
    from difflab.eval.digits_eval import evaluate_module

    return evaluate_module(module.eval(), n=n, batch_size=250)


def quality_rows(run: Path, sigma_rels, n: int) -> tuple[list[dict], dict]:
    """FD / accuracy of each reconstructed length, and of the run's fixed-decay EMA and raw weights."""
    from difflab.checkpoints import load_checkpoint, load_state_dict_checked, module_from_checkpoint
    from difflab.diffusion.posthoc_ema import sigma_rel_to_gamma
    from difflab.reconstruct_ema import reconstruct_weights
    from difflab.utils.errors import ConfigError

    last = run / "checkpoints" / "last.ckpt"
    module = module_from_checkpoint(last)  # the fixed-decay EMA weights
    fixed = {"ema": judge(module, n)}
    load_state_dict_checked(module, load_checkpoint(last)["current_model_state"], last)
    fixed["raw"] = judge(module, n)
    ema = module.run_config["callbacks"]["ema"]
    fixed["decay"] = ema["decay"] if ema.get("decay") is not None else f"null (sigma_rel {ema.get('sigma_rel')})"
    fixed["steps"] = int(load_checkpoint(last)["global_step"])
    rows = []
    for s in sigma_rels:
        try:
            rec = reconstruct_weights(run / "posthoc_ema", sigma_rel_to_gamma(s))
        except ConfigError as err:
            print(f"sigma_rel {s}: {err}", flush=True)
            continue
        load_state_dict_checked(module, rec["state_dict"], run)
        rows.append({"sigma_rel": s, "residual": rec["residual"], "step": rec["step"], **judge(module, n)})
        print(rows[-1], flush=True)
    return rows, fixed


def snapshot_cost(recipe: list[str], label: str, snapshot_every: int, repeats: int) -> list:
    """Per 1000 optimizer steps: the seconds of EMA updates and snapshot writes, and the MB written."""
    from hydra.utils import instantiate

    from difflab.callbacks.posthoc_ema import PostHocEMA
    from difflab.pipeline import fill_from_datamodule, trainable_parameters

    cfg = compose_train([*recipe, "callbacks=posthoc"], output_dir=tempfile.mkdtemp())
    fill_from_datamodule(cfg, instantiate(cfg.datamodule))
    module = instantiate(cfg.model)
    cb = PostHocEMA(
        sigma_rels=list(cfg.callbacks.posthoc_ema.sigma_rels),
        snapshot_every=snapshot_every,
        max_snapshots=None,
        dir=tempfile.mkdtemp(),
    )
    params = cb._trainable(module)
    cb.names, cb._params = [n for n, _ in params], [p for _, p in params]
    cb.emas = [[p.detach().float().clone() for _, p in params] for _ in cb.gammas]
    update = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for t in range(1, 21):
            cb._update(t)
        update.append((time.perf_counter() - t0) / 20)
    from safetensors.torch import save_file

    writes, size = [], 0
    for r in range(repeats):
        path = Path(cb.dir) / f"s{r}.safetensors"
        t0 = time.perf_counter()
        save_file(cb._tensors(module), str(path))
        writes.append(time.perf_counter() - t0)
        size = path.stat().st_size
    per_k = 1000 / snapshot_every
    return [
        label,
        f"{trainable_parameters(module) / 1e6:.2f}M",
        snapshot_every,
        f"{size / 1e6:.1f}",
        f"{per_k * size / 1e6:.0f}",
        f"{median(update) * 1e3:.2f}",
        f"{median(writes) * 1e3:.0f}",
        f"{1000 * median(update) + per_k * median(writes):.1f}",
    ]


def plot(rows: list[dict], fixed: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    s = [r["sigma_rel"] for r in rows]
    for i, (key, name) in enumerate((("fd", "FD (lower is better)"), ("accuracy", "accuracy"))):
        ax[i].plot(s, [r[key] for r in rows], "o-", label="post-hoc EMA")
        ax[i].axhline(fixed["ema"][key], color="C1", ls="--", label=f"fixed EMA decay {fixed['decay']}")
        ax[i].axhline(fixed["raw"][key], color="C2", ls=":", label="raw weights")
        ax[i].set_xscale("log")
        ax[i].set_xticks(s, [f"{v:g}" for v in s], rotation=45)
        ax[i].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax[i].set_xlabel("relative EMA length sigma_rel")
        ax[i].set_ylabel(name)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, default=None, help="a digits run trained with callbacks=posthoc")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--sigma-rels", type=float, nargs="+", default=list(SIGMA_RELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke run: 40 training steps, n 50, 3 lengths")
    p.add_argument(
        "--keep-quality",
        action="store_true",
        help="re-measure only the snapshot cost; keep the quality table of the last full run",
    )
    args = p.parse_args()
    set_threads(args.threads)
    extra = []
    if args.quick:
        args.n, args.sigma_rels, args.repeats = 50, [0.05, 0.07, 0.10], 2
        extra = ["trainer.max_steps=40", "callbacks.posthoc_ema.snapshot_every=5", "sampler.steps=3"]
    saved = Path(f"/tmp/difflab_bench_posthoc{'_quick' if args.quick else ''}_quality.json")
    if args.keep_quality:
        rows, fixed = json.loads(saved.read_text())
    else:
        run = args.run_dir or train_run(Path(f"/tmp/difflab_bench_posthoc{'_quick' if args.quick else ''}"), extra)
        rows, fixed = quality_rows(run, args.sigma_rels, args.n)
        saved.write_text(json.dumps([rows, fixed]))
    best = min(rows, key=lambda r: r["fd"])
    png = (RESULTS / "posthoc_ema.png") if not args.quick else Path(tempfile.mkdtemp()) / "posthoc_ema.png"
    plot(rows, fixed, png)
    cost = [snapshot_cost(["experiment=digits"], "digits", 150, args.repeats)]
    if not args.quick:
        cost.append(
            snapshot_cost(
                ["experiment=stl10_vpred_cfg", "trainer=cpu", "datamodule.download=false"],
                "stl10_vpred_cfg",
                150,
                args.repeats,
            )
        )
    table = [[f"{r['sigma_rel']:.3f}", f"{r['residual']:.2%}", f"{r['fd']:.2f}", f"{r['accuracy']:.3f}"] for r in rows]
    table += [
        [f"fixed EMA, decay {fixed['decay']}", "", f"{fixed['ema']['fd']:.2f}", f"{fixed['ema']['accuracy']:.3f}"],
        ["raw weights (no EMA)", "", f"{fixed['raw']['fd']:.2f}", f"{fixed['raw']['accuracy']:.3f}"],
    ]
    text = "\n".join(
        [
            "# Post-hoc EMA on digits: quality against the relative EMA length" + (" (quick)" if args.quick else ""),
            "",
            f"`python bench/bench_posthoc_ema.py --n {args.n}`: one `experiment=digits callbacks=posthoc` run "
            f"({fixed['steps']} steps, snapshots of sigma_rel 0.05 and 0.10 every 150 steps, plus the default EMA with "
            f"decay {fixed['decay']}); each length reconstructed at the last snapshot (profile residual: how far the "
            f"least-squares combination is from the wanted power-function profile, relative L2); {args.n} balanced "
            f"samples with the recipe's Heun-10 sampler and guidance 2, the same initial noise for every row; FD in the "
            f"digit classifier's features to the 1797 real digits (real-vs-real floor at n = 500: 3.14), accuracy by "
            f"the same classifier. Plot: `bench/results/posthoc_ema.png`.",
            "",
            md_table(["sigma_rel", "profile residual", "FD", "accuracy"], table),
            "",
            f"Best length: sigma_rel {best['sigma_rel']:.3f} (FD {best['fd']:.2f}, accuracy {best['accuracy']:.3f}) "
            f"against the fixed-decay EMA's FD {fixed['ema']['fd']:.2f}.",
            "",
            "Cost of the snapshots (two profiles, float32, no thinning), per 1000 optimizer steps: the EMA updates of "
            "every step (timed on the recipe's model) and the snapshot writes (safetensors to the local disk):",
            "",
            md_table(
                [
                    "recipe",
                    "trainable params",
                    "snapshot every",
                    "MB per snapshot",
                    "MB per 1000 steps",
                    "update ms per step",
                    "write ms per snapshot",
                    "s per 1000 steps",
                ],
                cost,
            ),
            "",
            f"Machine: {machine_description()}",
        ]
    )
    print(write_result("posthoc_ema", text, args.quick), flush=True)


if __name__ == "__main__":
    main()
