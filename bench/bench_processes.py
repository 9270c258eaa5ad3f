"""The formulation as an axis: the digits recipe trained under each noise process (vp, edm, flow) for the same
wall-clock, then sampled with each sampler at 10, 20 and 50 network evaluations (NFE).

Each process runs with its own default settings (``configs/process/<name>.yaml``: vp keeps the recipe's v-prediction
on the cosine tables; edm uses EDM's preconditioning, log-normal sigmas and loss weight; flow the velocity target with
logit-normal times), the same denoiser, data, guidance and EMA. Training is bounded by ``trainer.max_time`` alone
(``trainer.max_steps=-1``: the LR schedule decays over the wall-clock), one process after the other, ``--threads``
torch threads. Each trained model (EMA weights) then draws ``--n`` balanced samples per sampler x NFE with the same
initial noise, judged by the repo's digit classifier: FD in its 128-d features to all 1797 real digits, and accuracy.

    python bench/bench_processes.py [--budget 300] [--n 500] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_vs_diffusers import hms  # noqa: E402
from bench.common import QUIET, compose_train, machine_description, md_table, set_threads, write_result  # noqa: E402

PROCESSES = ("vp", "edm", "flow")
NFES = (10, 20, 50)
SAMPLERS = ("euler", "heun", "dpmpp_2m")  # euler = DDIM with eta 0 on every process


def steps_for(sampler: str, nfe: int) -> int:
    """Sampler steps that spend about ``nfe`` network evaluations (Heun: two per step but the last)."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def train_one(process: str, budget: float, out_dir: Path, extra: list[str]) -> dict:
    """Train the digits recipe under ``process`` for ``budget`` seconds; returns the EMA module and run facts."""
    from difflab.callbacks.ema import ema_module
    from difflab.pipeline import train

    cfg = compose_train(
        [
            "experiment=digits",
            f"process={process}",
            f"++trainer.max_time='{hms(budget)}'",
            "trainer.max_steps=-1",
            *QUIET,
            "logger=csv",
            *extra,
        ],
        output_dir=out_dir,
    )
    t0 = time.perf_counter()
    objs = train(cfg)
    return {
        "module": ema_module(objs["trainer"], objs["model"]),
        "steps": int(objs["trainer"].global_step),
        "train_s": time.perf_counter() - t0,
    }


def evaluate(module, n: int) -> list[dict]:
    """FD / accuracy per sampler and NFE, the same initial noise for every row."""
    from difflab.diffusion import samplers as S
    from difflab.eval.digits_eval import evaluate_module

    rows = []
    for name in SAMPLERS:
        for nfe in NFES:
            sampler = functools.partial(S.SAMPLERS[name], steps=steps_for(name, nfe))
            t0 = time.perf_counter()
            ev = evaluate_module(module, n=n, sampler=sampler, batch_size=250)
            rows.append(
                {
                    "sampler": name,
                    "nfe": S.model_evaluations(sampler, module.diffusion.process),
                    "fd": ev["fd"],
                    "accuracy": ev["accuracy"],
                    "sample_s": time.perf_counter() - t0,
                }
            )
            print(rows[-1], flush=True)
    return rows


def render(results: dict, args) -> str:
    table = []
    for process, res in results.items():
        for r in res["rows"]:
            table.append(
                [
                    process,
                    f"{res['steps']} ({res['steps'] / res['train_s']:.1f}/s)",
                    r["sampler"],
                    r["nfe"],
                    f"{r['fd']:.2f}",
                    f"{r['accuracy']:.3f}",
                ]
            )
    best = {p: min(res["rows"], key=lambda r: r["fd"]) for p, res in results.items()}
    winner = min(best, key=lambda p: best[p]["fd"])
    ranked = sorted(best, key=lambda p: best[p]["fd"])
    margin = best[ranked[1]]["fd"] / best[winner]["fd"] if len(ranked) > 1 else float("inf")
    lines = [
        "# Noise processes on digits: vp vs edm vs flow at equal wall-clock" + (" (quick)" if args.quick else ""),
        "",
        f"`python bench/bench_processes.py --budget {args.budget:g} --n {args.n} --threads {args.threads}`: the digits "
        f"recipe (`experiment=digits`) under `process=vp|edm|flow` with each process's default settings, each trained "
        f"for {args.budget:g} s of wall-clock (`trainer.max_steps=-1`, LR warm-up + cosine over the time budget), one "
        f"after the other with {args.threads} torch threads; EMA weights; {args.n} balanced samples per row with the "
        f"same initial noise, guidance scale 2 (the recipe's); FD in the digit classifier's features to all 1797 real "
        f"digits (real-vs-real floor at n = 500 in BENCHMARKS.md), accuracy = agreement with the requested label. "
        f"euler = DDIM with eta 0 on every process; NFE = network evaluations (each a batched conditional + "
        f"unconditional forward).",
        "",
        md_table(["process", "optimizer steps", "sampler", "NFE", "FD", "accuracy"], table),
        "",
        "Best row per process: "
        + "; ".join(
            f"{p}: {best[p]['sampler']} NFE {best[p]['nfe']} FD {best[p]['fd']:.2f} "
            f"(accuracy {best[p]['accuracy']:.3f})"
            for p in ranked
        )
        + ".",
        f"Lowest FD: {winner} ({margin:.2f}x better than the next process's best row).",
        "",
        f"Machine: {machine_description()}",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=None, help="training seconds per process (300; 40 --quick)")
    p.add_argument("--n", type=int, default=None, help="samples per row (500; 100 --quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--processes", nargs="+", default=list(PROCESSES), choices=PROCESSES)
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for every run")
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other processes' results of an earlier run (rerun one process that was disturbed by other load)",
    )
    args = p.parse_args()
    args.budget = args.budget or (40.0 if args.quick else 300.0)
    args.n = args.n or (100 if args.quick else 500)
    set_threads(args.threads)
    out_root = Path(f"/tmp/difflab_bench_processes{'_quick' if args.quick else ''}")
    earlier = out_root / "results.json"
    results = json.loads(earlier.read_text()) if args.merge and earlier.is_file() else {}
    for process in args.processes:
        run = train_one(process, args.budget, out_root / process, args.override)
        print(process, run["steps"], "steps", flush=True)
        results[process] = {"steps": run["steps"], "train_s": run["train_s"], "rows": evaluate(run["module"], args.n)}
        results = {p: results[p] for p in PROCESSES if p in results}
        (out_root / "results.json").write_text(json.dumps(results, indent=1))
        print(write_result("processes", render(results, args), args.quick), flush=True)


if __name__ == "__main__":
    main()
