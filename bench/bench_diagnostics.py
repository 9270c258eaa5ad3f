"""Cost of the diagnostics: a digits training run with the default callbacks vs with `callbacks=diagnostics`.

Both runs use the default digits experiment (its UNet2D, batch 64, validation every 500 steps, class grid and
checkpoint every 1000 steps and at the end; its max_time cap is lifted) for --steps optimizer steps (600; 200 with
--quick), each in a fresh subprocess, back to back: (default, diagnostics) x --repeats (2). Measured per run:
- the wall time and the process CPU time of ``trainer.fit`` (data loading, validation, checkpoints and the default
  class grid included); on a shared CPU the wall time swings with other users' load, the CPU time much less;
- inside the diagnostics run, the time spent in every hook a diagnostic callback overrides (timed wrappers), so the overhead
  can also be read without the noise of a shared CPU: ``hooks / (fit - hooks)``.
Overhead = (diagnostics - default) / default, per pair, for wall and CPU time. Target: under 10% at the default
schedule.

    PYTHONPATH=. python bench/bench_diagnostics.py [--quick] [--steps 600] [--repeats 2] [--threads 1]
        [--keep DIR]   # keep the last diagnostics run (figures, csv) in DIR

Prints a markdown table and writes bench/results/diagnostics.md (diagnostics_quick.md with --quick).
torch runs with --threads threads (1 by default: on a shared, oversubscribed CPU more threads are slower).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIAG_MODULES = {
    f"difflab.callbacks.{m}"
    for m in (
        "reconstruction",
        "denoise_collage",
        "guidance_grid",
        "timestep_loss",
        "embedding_tsne",
        "training_health",
        "sample_metrics",
    )
}


def hook_names(cb) -> list[str]:
    """Every Lightning hook a diagnostic callback overrides (on_*, setup, teardown), so none of its work goes untimed."""
    import lightning as L

    base = L.Callback
    return [
        n
        for n in dir(cb)
        if (n.startswith("on_") or n in ("setup", "teardown"))
        and callable(getattr(cb, n))
        and getattr(type(cb), n, None) is not getattr(base, n, None)
    ]


def child(args) -> None:
    """One training run in this process; prints a JSON line with its timings."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from difflab.pipeline import build
    from difflab.utils.compose import compose_train

    out = Path(args.out_dir)
    overrides = [
        "logger=default",
        "~callbacks.progress_bar",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"trainer.max_steps={args.steps}",
        "trainer.max_time=null",
        f"paths.data_dir={out / 'data'}",
    ]
    if args.config == "diagnostics":
        overrides.insert(0, "callbacks=diagnostics")
    objs = build(compose_train(out, overrides))
    spent: dict[str, float] = defaultdict(float)
    for cb in objs["callbacks"]:
        if type(cb).__module__ not in DIAG_MODULES:
            continue
        for hook in hook_names(cb):
            if hasattr(cb, hook):
                original = getattr(cb, hook)

                def timed(*a, _orig=original, _name=cb.__class__.__name__, **kw):
                    t0 = time.perf_counter()
                    try:
                        return _orig(*a, **kw)
                    finally:
                        spent[_name] += time.perf_counter() - t0

                setattr(cb, hook, timed)
    t0, c0 = time.perf_counter(), time.process_time()
    objs["trainer"].fit(objs["model"], datamodule=objs["datamodule"])
    fit_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    figures = sorted(str(p.relative_to(out)) for p in (out / "figures").rglob("*.png"))
    print(
        "RESULT "
        + json.dumps(
            {
                "config": args.config,
                "fit_s": fit_s,
                "cpu_s": cpu_s,
                "hooks": dict(spent),
                "figures": len(figures),
                "steps": int(objs["trainer"].global_step),
            }
        )
    )


def run_one(config: str, steps: int, threads: int, out_dir: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--config",
        config,
        "--steps",
        str(steps),
        "--threads",
        str(threads),
        "--out-dir",
        str(out_dir),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{config} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 steps (a smoke run; overhead is higher on short runs)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", type=Path, default=None, help="copy the last diagnostics run directory here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (200 if args.quick else 600)
    if args.child:
        child(args)
        return

    pairs = []
    with tempfile.TemporaryDirectory(prefix="difflab_diag_bench_") as tmp:
        for r in range(args.repeats):
            pair = {}
            for config in ("default", "diagnostics"):
                out = Path(tmp) / f"{config}_{r}"
                res = run_one(config, args.steps, args.threads, out)
                pair[config] = res
                detail = ", ".join(f"{k} {v:.1f}" for k, v in sorted(res["hooks"].items()))
                print(
                    f"repeat {r + 1} {config}: fit {res['fit_s']:.1f} s (CPU {res['cpu_s']:.1f} s), diagnostic hooks "
                    f"{sum(res['hooks'].values()):.1f} s ({detail}), {res['figures']} figures",
                    flush=True,
                )
                if config == "diagnostics" and args.keep and r == args.repeats - 1:
                    shutil.rmtree(args.keep, ignore_errors=True)
                    shutil.copytree(out, args.keep, ignore=shutil.ignore_patterns("*.ckpt"))
            pairs.append(pair)
    lines = [
        "# Diagnostics overhead (`callbacks=diagnostics` vs default callbacks)",
        "",
        f"Digits experiment defaults, {args.steps} steps, torch threads {args.threads}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared); "
        f"`PYTHONPATH=. python bench/bench_diagnostics.py{' --quick' if args.quick else ''}`.",
        "",
        "| pair | default fit: wall / CPU (s) | diagnostics fit: wall / CPU (s) | overhead: wall | overhead: CPU "
        "| diagnostic hooks, wall (s) | overhead: hooks / rest |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(pairs, 1):
        base, diag = p["default"]["fit_s"], p["diagnostics"]["fit_s"]
        base_cpu, diag_cpu = p["default"]["cpu_s"], p["diagnostics"]["cpu_s"]
        hooks = sum(p["diagnostics"]["hooks"].values())
        lines.append(
            f"| {i} | {base:.1f} / {base_cpu:.1f} | {diag:.1f} / {diag_cpu:.1f} | "
            f"{100 * (diag - base) / base:+.1f}% | {100 * (diag_cpu - base_cpu) / base_cpu:+.1f}% | "
            f"{hooks:.1f} | {100 * hooks / (diag - hooks):.1f}% |"
        )
        steps = {p[c]["steps"] for c in p}
        if steps != {args.steps}:
            lines.append(f"| | WARNING: runs stopped at steps {sorted(steps)}, not {args.steps} | | | | | |")
    lines += [
        "",
        "Time per diagnostic callback (s), per pair:",
        "",
        "| callback | " + " | ".join(f"pair {i}" for i in range(1, len(pairs) + 1)) + " |",
        "|---|" + "---|" * len(pairs),
    ]
    names = sorted({n for p in pairs for n in p["diagnostics"]["hooks"]})
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{p['diagnostics']['hooks'].get(n, 0):.1f}" for p in pairs) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    dest = REPO / "bench" / "results" / ("diagnostics_quick.md" if args.quick else "diagnostics.md")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
