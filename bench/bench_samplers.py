"""Sampler benchmarks: exactness on closed-form data, and quality per model evaluation on the trained digits model.

1. ``--gaussian``: every sampler driven by the exact denoiser E[x0 | x_t] of data with known moments (a 3-D Gaussian,
   a 2-D mixture of three Gaussians; ``difflab.diffusion.gaussian``). Deterministic samplers on Gaussian data are affine
   in x_T, so their output mean / covariance are computed exactly (no Monte Carlo error); DDPM and the mixture use
   Monte Carlo with the sampling floor of N true samples alongside. Writes bench/results/samplers_gaussian.md.

2. ``--ckpt PATH``: the trained digits model (``difflab.checkpoints.module_from_checkpoint``) sampled with DDPM-1000,
   DDIM-{10,25,50,100}, DPM-Solver++(2M)-{10,20}, Heun-{10,20}: FD (Frechet distance in the digit classifier's
   features, against all 1797 real digits) and class accuracy of ``--n`` balanced samples per row (500; 100 with
   --quick), the same initial noise for every row, plus NFE (network evaluations, each one batched conditional +
   unconditional forward with CFG) and wall time. Writes bench/results/samplers_digits.md (``_quick`` with --quick)
   after every row, so a long run leaves partial results.

    PYTHONPATH=. python bench/bench_samplers.py --gaussian
    PYTHONPATH=. python bench/bench_samplers.py --processes     # every process, exact moments; spacing before/after
    PYTHONPATH=. python bench/bench_samplers.py --ckpt <digits_ref>/last.ckpt [--quick] [--spacing trailing]
    (<digits_ref>: a digits run of process=vp sampler=ddim, e.g. logs/digits_ref; its last checkpoint)
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import shown_path  # noqa: E402
from difflab.diffusion import samplers as S  # noqa: E402
from difflab.diffusion.gaussian import GaussianMixture, affine_moments, exact_net, moment_errors, sample_moments  # noqa: E402
from difflab.diffusion.guidance import guided_model_fn  # noqa: E402
from difflab.diffusion.processes import EDMProcess, FlowProcess, VPProcess  # noqa: E402

RESULTS = REPO / "bench" / "results"
DIGIT_ROWS = [
    ("ddim", 10),
    ("ddim", 25),
    ("ddim", 50),
    ("ddim", 100),
    ("dpmpp_2m", 10),
    ("dpmpp_2m", 20),
    ("heun", 10),
    ("heun", 20),
    ("ddpm", 1000),
]
LABEL = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)", "euler": "Euler", "heun": "Heun"}


# ---------------------------------------------------------------------------------------------- closed-form data
def gaussian_3d() -> GaussianMixture:
    """A correlated 3-D Gaussian with variances spanning 30x (small-variance directions show sampler error)."""
    cov = torch.tensor([[0.30, 0.12, 0.0], [0.12, 0.10, 0.02], [0.0, 0.02, 0.01]], dtype=torch.float64)
    return GaussianMixture.gaussian([0.5, -0.3, 0.2], cov)


def mixture_2d() -> GaussianMixture:
    """Three well-separated, unequal 2-D Gaussians (a multimodal, nonlinear denoiser)."""
    means = [[-0.6, -0.4], [0.5, -0.3], [0.0, 0.6]]
    covs = [[[0.02, 0.0], [0.0, 0.01]], [[0.015, 0.005], [0.005, 0.02]], [[0.01, 0.0], [0.0, 0.03]]]
    return GaussianMixture([0.5, 0.3, 0.2], means, covs)


def _model_fn(data, sch, prediction="v"):
    return guided_model_fn(exact_net(data, sch, prediction), sch, prediction, {}, None)


def exact_rows(data, sch, steps_list, names=("ddim", "euler", "dpmpp_2m", "heun"), spacing=None, prediction="v"):
    """[(name, steps, nfe, mean_err, cov_err)] with exact affine moments (x_T scaled by the process's prior std)."""
    mf = _model_fn(data, sch, prediction)
    rows = []
    for name in names:
        for steps in steps_list:
            fn = functools.partial(S.SAMPLERS[name], steps=steps, spacing=spacing)
            m, c = affine_moments(lambda x, fn=fn: fn(mf, x * sch.prior_std, sch), data.dim)
            rows.append((name, steps, S.model_evaluations(fn, sch), *moment_errors(m, c, data)))
    return rows


def mc_rows(data, sch, runs, n, seed=0):
    """[(name, steps, nfe, mean_err, cov_err)] from n Monte Carlo samples per run (same x_T for all)."""
    mf = _model_fn(data, sch)
    x_T = torch.randn(n, data.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rows = []
    for name, steps, kw in runs:
        fn = functools.partial(S.SAMPLERS[name], steps=steps, **kw)
        x = fn(mf, x_T.clone(), sch, generator=torch.Generator().manual_seed(seed + 1))
        rows.append(
            (
                name + ("(eta=1)" if kw.get("eta") else ""),
                steps,
                S.model_evaluations(fn, sch),
                *moment_errors(*sample_moments(x), data),
            )
        )
    return rows


def mc_floor(data, n, reps=20, seed=100):
    """Mean moment errors of n i.i.d. TRUE data samples (what a perfect sampler would score with n samples)."""
    errs = [
        moment_errors(*sample_moments(data.sample(n, torch.Generator().manual_seed(seed + r))), data)
        for r in range(reps)
    ]
    return sum(e[0] for e in errs) / reps, sum(e[1] for e in errs) / reps


def _table(rows, header="| sampler | steps | NFE | mean error | cov. error (rel.) |") -> list[str]:
    out = [header, "|---|---:|---:|---:|---:|"]
    for name, steps, nfe, me, ce in rows:
        out.append(f"| {LABEL.get(name, name)} | {steps} | {nfe} | {me:.2e} | {ce:.2e} |")
    return out


def run_gaussian(out_path: Path, n_mc: int = 20000) -> str:
    t0 = time.perf_counter()
    g3, mix = gaussian_3d(), mixture_2d()
    steps_list = [5, 10, 20, 50, 100, 250]
    lines = [
        "# Samplers on data with a closed-form optimal denoiser",
        "",
        "Each sampler is driven by the exact posterior mean E[x0 | x_t] (`difflab.diffusion.gaussian`), fed through "
        "`guided_model_fn` as a v-prediction network, so only the sampler's own discretisation error remains. "
        "mean error = ||mean - mu||_2, cov. error = ||Cov - Sigma||_F / ||Sigma||_F. Schedule: cosine, T = 1000, "
        "trailing spacing unless stated. Heun: Euler steps from sigma > 80 and to sigma 0 (see its docstring).",
        "",
        f"Generated by `PYTHONPATH=. python bench/bench_samplers.py --gaussian` "
        f"(torch {torch.__version__}, {platform.machine()}).",
        "",
    ]
    for title, zero in (("cosine", False), ("cosine, zero terminal SNR", True)):
        sch = VPProcess("cosine", 1000, zero_terminal_snr=zero, spacing="trailing")
        lines += [
            f"## 3-D Gaussian, {title}: exact moments (deterministic samplers are affine in x_T)",
            "",
            f"mu = {g3.mean.tolist()}, eigenvalues of Sigma = "
            f"{[round(v, 4) for v in torch.linalg.eigvalsh(g3.cov).tolist()]}.",
            "",
        ]
        lines += _table(exact_rows(g3, sch, steps_list)) + [""]
    sch = VPProcess("cosine", 1000, spacing="trailing")
    lines += [
        "## Spacing: DDIM on the 3-D Gaussian, exact moments",
        "",
        "'leading' starts at t = 900 (10 steps) / 980 (50 steps), where x_T ~ N(0, I) is not the true marginal: "
        "a mean error that more steps do not remove (Lin et al. 2024).",
        "",
    ]
    rows = []
    for spacing in ("leading", "linspace", "trailing"):
        rows += [(f"ddim ({spacing})", *r[1:]) for r in exact_rows(g3, sch, [10, 50], names=("ddim",), spacing=spacing)]
    lines += _table(rows) + [""]
    floor_g = mc_floor(g3, n_mc)
    runs = [("ddpm", s, {}) for s in (10, 50, 100, 250, 1000)] + [("ddim", s, {"eta": 1.0}) for s in (10, 100)]
    lines += [
        f"## 3-D Gaussian, stochastic samplers: Monte Carlo, N = {n_mc}",
        "",
        f"Sampling floor (N true samples): mean error {floor_g[0]:.2e}, cov. error {floor_g[1]:.2e}.",
        "",
    ]
    lines += _table(mc_rows(g3, sch, runs, n_mc)) + [""]
    floor_m = mc_floor(mix, n_mc)
    runs = [(name, s, {}) for name in ("ddim", "dpmpp_2m", "heun") for s in (10, 20, 50)] + [("ddpm", 250, {})]
    lines += [
        f"## 2-D mixture of three Gaussians: Monte Carlo, N = {n_mc}",
        "",
        f"weights {mix.weights.tolist()}, means {mix.means.tolist()}. Sampling floor (N true samples): mean "
        f"error {floor_m[0]:.2e}, cov. error {floor_m[1]:.2e}.",
        "",
    ]
    lines += _table(mc_rows(mix, sch, runs, n_mc)) + [""]
    lines.append(f"Total time {time.perf_counter() - t0:.0f} s.")
    text = "\n".join(lines) + "\n"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    return text


def run_processes_exact(out_path: Path) -> str:
    """Exact moments (no Monte Carlo) of every deterministic sampler on every process, and the default spacing before
    and after it became trailing: the fast part of the closed-form benchmark."""
    t0 = time.perf_counter()
    g3 = gaussian_3d()
    steps_list = [5, 10, 20, 50]
    sch = VPProcess("cosine", 1000, spacing="trailing")
    lines = [
        "# Samplers on every process, with the exact denoiser of a 3-D Gaussian",
        "",
        "Deterministic samplers driven by E[x0 | x_t] of a correlated 3-D Gaussian through `guided_model_fn` (the "
        "process's time input, input scaling and target conversion included), so only the sampler's own "
        "discretisation error remains; output moments are exact (the samplers are affine in x_T). mean error = "
        "||mean - mu||_2, cov. error = ||Cov - Sigma||_F / ||Sigma||_F.",
        "",
        f"Generated by `python bench/bench_samplers.py --processes` (torch {torch.__version__}, {platform.machine()}).",
        "",
    ]
    lines += [
        "## The default spacing, before (leading) and after (trailing)",
        "",
        "Every schedule config used `leading` until the continuous-time core landed; the default is now "
        "`trailing` (the grid starts at t = T - 1, the noise end). Exact moments on the 3-D Gaussian, cosine "
        "T = 1000.",
        "",
    ]
    rows = []
    for name in ("ddim", "dpmpp_2m", "heun"):
        for spacing in ("leading", "trailing"):
            rows += [
                (f"{name} ({spacing})", *r[1:])
                for r in exact_rows(g3, sch, [10, 20, 50, 100], names=(name,), spacing=spacing)
            ]
    lines += _table(rows) + [""]
    for label, process, prediction in (
        ("edm (Karras grid, EDM preconditioning)", EDMProcess(), "edm"),
        ("flow (linear path, velocity target)", FlowProcess(), "flow"),
        ("flow, shift 3", FlowProcess(shift=3.0), "flow"),
    ):
        lines += [
            f"## 3-D Gaussian, process {label}: exact moments",
            "",
            "The same exact denoiser through the process's own time input, input scaling and target.",
            "",
        ]
        lines += _table(exact_rows(g3, process, steps_list, prediction=prediction)) + [""]
    lines.append(f"Total time {time.perf_counter() - t0:.0f} s.")
    text = "\n".join(lines) + "\n"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    return text


# ---------------------------------------------------------------------------------------------- digits model
def _count_net_calls(module):
    """Replace module.net by a counting wrapper (instance attribute); returns the counter list."""
    calls = []
    original = module.net

    def counting(x_t, t, cond):
        calls.append(x_t.shape[0])
        return original(x_t, t, cond)

    module.net = counting
    return calls


def run_digits(
    ckpt: str,
    out_path: Path,
    n: int,
    spacing: str | None,
    seed: int = 0,
    rows=DIGIT_ROWS,
    batch_size: int | None = None,
) -> str:
    from difflab.checkpoints import load_checkpoint, module_from_checkpoint
    from difflab.eval.digits_eval import evaluate_samples, fd_to_real, real_digit_features

    module = module_from_checkpoint(ckpt)
    info = load_checkpoint(ckpt)
    step = info.get("global_step")
    sch = module.diffusion.process
    real = real_digit_features()
    floor = fd_to_real(real_digit_features(n=n, seed=seed), real)
    labels = torch.arange(n) % 10
    noise = torch.randn((n, *module.diffusion.sample_shape), generator=torch.Generator().manual_seed(seed))
    batch_size = batch_size or n
    calls = _count_net_calls(module)
    header = [
        "# Samplers on the trained digits model",
        "",
        f"Checkpoint `{shown_path(ckpt)}` (step {step}); process {sch!r}; prediction {module.diffusion.objective.prediction}; "
        f"guidance scale {module.diffusion.guidance.scale}; x0 clip {module.diffusion.objective.x0_clip}; sampler spacing "
        f"{spacing or getattr(sch, 'spacing', 'the process grid') + ' (the process’s)'}.",
        f"{n} balanced samples per row (labels i % 10), the same initial noise (seed {seed}) for every row. FD = "
        f"Frechet distance in the digit classifier's 128-d features to all 1797 real digits "
        f"(`difflab.eval.digits_eval`); accuracy = the classifier's agreement with the requested label. NFE = network "
        f"evaluations (each a batched conditional + unconditional pass for CFG). Wall time on "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads, shared machine (timings are indicative).",
        f"Reference: FD of {n} real digits to all real digits = {floor:.2f}.",
        "",
        "| sampler | steps | NFE | FD | accuracy | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    body = {}
    results = {}
    for name, steps in rows:
        fn = functools.partial(S.SAMPLERS[name], steps=steps, spacing=spacing)
        calls.clear()
        t0 = time.perf_counter()
        imgs = []
        for i in range(0, n, batch_size):
            j = min(n, i + batch_size)
            imgs.append(
                module.diffusion.sample(
                    module,
                    j - i,
                    labels[i:j],
                    sampler=fn,
                    noise=noise[i:j],
                    generator=torch.Generator().manual_seed(seed + 1 + i),
                ).cpu()
            )
        wall = time.perf_counter() - t0
        nfe = len(calls) // max(1, -(-n // batch_size))
        ev = evaluate_samples(torch.cat(imgs), labels, real)
        results[(name, steps)] = ev
        body[(name, steps)] = (
            f"| {LABEL[name]} | {steps} | {nfe} | {ev['fd']:.2f} | {ev['accuracy']:.3f} | {wall:.0f} |"
        )
        print(body[(name, steps)], flush=True)
        footer = []
        if ("dpmpp_2m", 20) in results and ("ddim", 100) in results:
            a, b = results[("dpmpp_2m", 20)]["fd"], results[("ddim", 100)]["fd"]
            footer = ["", f"DPM-Solver++(2M)-20 FD / DDIM-100 FD = {a / b:.3f} (target: within 10%, i.e. <= 1.10)."]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        order = [r for r in DIGIT_ROWS if r in body] + [r for r in body if r not in DIGIT_ROWS]
        out_path.write_text("\n".join(header + [body[r] for r in order] + footer) + "\n")
    return out_path.read_text()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gaussian", action="store_true", help="closed-form exactness tables (vp, with Monte Carlo)")
    p.add_argument("--processes", action="store_true", help="exact tables on every process + the spacing default")
    p.add_argument("--ckpt", help="digits checkpoint for the FD / accuracy table")
    p.add_argument("--quick", action="store_true", help="fewer samples (100 per digits row, 5000 Monte Carlo)")
    p.add_argument("--n", type=int, help="samples per digits row (default 500, 100 with --quick)")
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"], help="override the schedule's spacing")
    p.add_argument("--rows", nargs="*", help="subset of digits rows, e.g. ddim-10 heun-20")
    p.add_argument("--batch-size", type=int, help="samples per module.sample call (default: all at once)")
    p.add_argument("--out", help="output markdown path")
    args = p.parse_args(argv)
    if not args.gaussian and not args.ckpt and not args.processes:
        p.error("give --gaussian, --processes and/or --ckpt PATH")
    suffix = "_quick" if args.quick else ""
    if args.processes:
        print(run_processes_exact(RESULTS / "samplers_processes.md"))
    if args.gaussian:
        out = Path(args.out) if args.out and not args.ckpt else RESULTS / f"samplers_gaussian{suffix}.md"
        print(run_gaussian(out, n_mc=5000 if args.quick else 20000))
    if args.ckpt:
        n = args.n or (100 if args.quick else 500)
        rows = DIGIT_ROWS
        if args.rows:
            rows = [(r.rsplit("-", 1)[0], int(r.rsplit("-", 1)[1])) for r in args.rows]
        default = RESULTS / f"samplers_digits{'_' + args.spacing if args.spacing else ''}{suffix}.md"
        out = Path(args.out) if args.out else default
        run_digits(args.ckpt, out, n, args.spacing, rows=rows, batch_size=args.batch_size)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
