"""Guidance methods on digits: FD and accuracy against guidance strength for cfg, cfgpp, apg and autoguidance at
equal NFE, from one trained checkpoint (EMA weights).

Every row samples ``--n`` balanced digits with the same sampler, steps and initial noise (DDIM by default: the
sampler through which CFG++'s unconditional re-noising acts, see src/diffusion/guidance.py), so every method spends
the same network evaluations: two per step (conditional + unconditional, or main + guide for autoguidance; scale 1
of cfg / apg / autoguidance is one). Strength is each method's ``guidance.scale``: s in u + s (c - u) for cfg, apg
and autoguidance (w), lambda in [0, 1] for cfgpp. The judge is the repo's digit classifier: FD in its 128-d features
to all 1797 real digits, and accuracy against the requested label.

    python bench/bench_guidance.py --ckpt runs/digits/checkpoints/last.ckpt \
        --guide runs/digits/checkpoints/step_0000500.ckpt [--n 500] [--sampler ddim] [--steps 16] [--quick]

Writes bench/results/guidance.md (table), guidance.png (FD and accuracy vs strength, one line per method) and
guidance_grids.png (a class grid per method at its lowest-FD strength); ``--quick``: *_quick.* files.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, machine_description, md_table, set_threads, write_result  # noqa: E402

STRENGTHS = {
    "cfg": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
    "cfgpp": [0.2, 0.4, 0.6, 0.8, 1.0],
    "apg": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
    "autoguidance": [1.0, 1.5, 2.0, 2.5, 3.0, 4.0],
}
QUICK_STRENGTHS = {"cfg": [1.0, 3.0], "cfgpp": [0.3, 0.8], "apg": [1.0, 3.0], "autoguidance": [1.0, 2.0]}
APG_OPTIONS = {"eta": 0.0, "norm_threshold": 0.0, "momentum": 0.0}


def results_folder() -> Path:
    """Where write_result puts the table (``DIFFLAB_BENCH_RESULTS`` redirects it); the PNGs go next to it."""
    return Path(os.environ.get("DIFFLAB_BENCH_RESULTS") or RESULTS)


@contextlib.contextmanager
def guidance_as(module, overrides: dict):
    """The module's guidance with ``overrides`` on top (None values clear a setting), restored afterwards."""
    from difflab.diffusion.guidance import GUIDANCE_METHODS

    saved = module.diffusion.guidance
    settings = {**{k: v for k, v in saved.settings().items() if k != "scale"}, **overrides}  # the strength: per call
    method = settings.pop("method")
    cls = GUIDANCE_METHODS[method]
    module.diffusion.guidance = cls(**{k: v for k, v in settings.items() if k in cls.keys() and v is not None})
    try:
        yield module
    finally:
        module.diffusion.guidance = saved


def method_settings(method: str, args) -> dict:
    """The guidance keys a method runs with (besides its strength)."""
    base = {"method": method, "rescale": 0.0, "interval": None, "per_class": None}
    if method == "apg":
        base.update(eta=args.apg_eta, norm_threshold=args.apg_norm_threshold, momentum=args.apg_momentum)
    if method == "autoguidance":
        base["guide_ckpt"] = args.guide
    return base


def evaluate(module, methods: list[str], strengths: dict, args) -> list[dict]:
    """FD / accuracy per method and strength, the same sampler, steps and initial noise for every row."""
    from difflab.diffusion import samplers as S
    from difflab.eval.digits_eval import evaluate_module

    sampler = functools.partial(S.SAMPLERS[args.sampler], steps=args.steps)
    steps_nfe = S.model_evaluations(sampler, module.diffusion.process)
    rows = []
    for method in methods:
        for strength in strengths[method]:
            t0 = time.perf_counter()
            with guidance_as(module, method_settings(method, args)):
                ev = evaluate_module(module, n=args.n, sampler=sampler, guidance_scale=strength, batch_size=250)
            single = strength == 1.0 and method != "cfgpp"
            rows.append(
                {
                    "method": method,
                    "strength": strength,
                    "nfe": steps_nfe * (1 if single else 2),
                    "fd": ev["fd"],
                    "accuracy": ev["accuracy"],
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(rows[-1], flush=True)
    return rows


def best_rows(rows: list[dict]) -> dict[str, dict]:
    """The lowest-FD row of each method."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["method"] not in best or r["fd"] < best[r["method"]]["fd"]:
            best[r["method"]] = r
    return best


def plot(rows: list[dict], path: Path) -> Path:
    """FD and accuracy against strength, one line per method (cfgpp's lambda on its own top axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "fd", "FD (digit classifier features)"), (axes[1], "accuracy", "accuracy")):
        top = ax.twiny()
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["strength"], r[key]) for r in rows if r["method"] == method]
            target = top if method == "cfgpp" else ax
            target.plot(*zip(*pts), marker="o", label=method, color=f"C{list(STRENGTHS).index(method)}")
        ax.set_xlabel("scale s (cfg, apg) / w (autoguidance)")
        top.set_xlabel("lambda (cfgpp)")
        top.set_xlim(0, 1.05)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0] + top.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def grids(module, best: dict[str, dict], args, path: Path) -> Path:
    """One fixed-seed class grid per method at its best strength, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from difflab.diagnostics.class_grid import render_grid
    from difflab.diffusion import samplers as S

    sampler = functools.partial(S.SAMPLERS[args.sampler], steps=args.steps)
    fig, axes = plt.subplots(1, len(best), figsize=(3.2 * len(best), 4.2), squeeze=False)
    for ax, (method, row) in zip(axes[0], best.items()):
        png = path.with_name(f"{path.stem}_{method}.png")
        with guidance_as(module, method_settings(method, args)):
            render_grid(module, png, n_cols=8, guidance_scale=row["strength"], seed=0, sampler=sampler)
        ax.imshow(Image.open(png))
        png.unlink()
        ax.set_title(f"{method} {row['strength']:g}\nFD {row['fd']:.2f}, acc {row['accuracy']:.3f}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(rows: list[dict], args, module) -> str:
    best = best_rows(rows)
    table = [
        [r["method"], f"{r['strength']:g}", r["nfe"], f"{r['fd']:.2f}", f"{r['accuracy']:.3f}", f"{r['seconds']:.0f}"]
        for r in rows
    ]
    ranked = sorted(best, key=lambda m: best[m]["fd"])
    lines = [
        "# Guidance methods on digits: FD and accuracy against strength at equal NFE"
        + (" (quick)" if args.quick else ""),
        "",
        f"`{' '.join(['python', 'bench/bench_guidance.py', *sys.argv[1:]])}`",
        "",
        f"Checkpoint `{args.ckpt}` (EMA weights; process {module.diffusion.process.name}, prediction "
        f"{module.diffusion.objective.prediction}); autoguidance's guide `{args.guide}`. {args.n} balanced samples per row, "
        f"sampler {args.sampler} with {args.steps} steps and the same initial noise for every row; NFE = network "
        f"evaluations per sample (two per step for every guided row). Strength = `guidance.scale`: s for cfg and apg, "
        f"w for autoguidance, lambda for cfgpp. APG with eta {args.apg_eta:g}, norm_threshold "
        f"{args.apg_norm_threshold:g}, momentum {args.apg_momentum:g}. FD in the digit classifier's 128-d features "
        f"to all 1797 real digits; accuracy = agreement with the requested label.",
        "",
        md_table(["method", "strength", "NFE", "FD", "accuracy", "seconds"], table),
        "",
        "Best strength per method (lowest FD): "
        + "; ".join(
            f"{m} {best[m]['strength']:g}: FD {best[m]['fd']:.2f} (accuracy {best[m]['accuracy']:.3f})" for m in ranked
        )
        + ".",
        "",
        "Plot: `guidance.png`; grids at each method's best strength: `guidance_grids.png`.",
        "",
        f"Machine: {machine_description()}",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a trained digits checkpoint (class-conditional)")
    p.add_argument(
        "--guide",
        default=None,
        help="autoguidance's guide: a weaker checkpoint of the same setup, e.g. "
        "an earlier step of the same run (absent: autoguidance skipped)",
    )
    p.add_argument("--n", type=int, default=None, help="samples per row (500; 40 --quick)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "euler", "heun", "dpmpp_2m"])
    p.add_argument("--steps", type=int, default=None, help="sampler steps, the same for every method (16; 4 --quick)")
    p.add_argument("--apg-eta", type=float, default=APG_OPTIONS["eta"])
    p.add_argument("--apg-norm-threshold", type=float, default=APG_OPTIONS["norm_threshold"])
    p.add_argument("--apg-momentum", type=float, default=APG_OPTIONS["momentum"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="smoke test: few samples, 2 strengths per method")
    args = p.parse_args()
    args.n = args.n or (40 if args.quick else 500)
    args.steps = args.steps or (4 if args.quick else 16)
    set_threads(args.threads)

    from difflab.checkpoints import module_from_checkpoint

    module = module_from_checkpoint(args.ckpt).to(args.device)
    methods = [m for m in STRENGTHS if m != "autoguidance" or args.guide]
    rows = evaluate(module, methods, QUICK_STRENGTHS if args.quick else STRENGTHS, args)
    suffix = "_quick" if args.quick else ""
    folder = results_folder()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"guidance{suffix}.json").write_text(json.dumps(rows, indent=1))
    print(plot(rows, folder / f"guidance{suffix}.png"), flush=True)
    print(grids(module, best_rows(rows), args, folder / f"guidance_grids{suffix}.png"), flush=True)
    print(write_result("guidance", render(rows, args, module), args.quick), flush=True)


if __name__ == "__main__":
    main()
