"""How large sCM's time derivative is through a trained denoiser: the quantity whose growth sCM's paper (Lu & Song
2024, section 4.1) blames for unstable continuous-time consistency training, measured on digits checkpoints.

For each checkpoint: 512 training digits (labels as conditions), sCM's noise levels (sigma_d tan t ~ lognormal(-1,
1.4), the method's defaults), the data's own trajectory velocity dx/dt (sCT's), and one forward-mode pass
(``difflab.diffusion.consistency.time_derivative``) of the network's TrigFlow output F (``ContinuousConsistency.
trigflow_output``). Reports, per band of TrigFlow time t, the root-mean-square of sigma_d dF/dt, of the part that comes
from the time input alone (dx/dt = 0), and of sCM's tangent g (``scm_tangent``, warmup 1) before its normalisation.
A denoiser whose time embedding is steep in t (``process.time_scale`` 1000: the sinusoids see 1000 t) has a large
time-input part; the tangent normalisation bounds the target's step but not this term's share of it.

    PYTHONPATH=. python bench/bench_scm_tangent.py NAME=<ckpt> [NAME=<ckpt> ...] [--n 512] [--name scm_tangent]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine_description, md_table, set_threads, shown_path, write_result  # noqa: E402

BANDS = [(0.0, 0.2), (0.2, 0.6), (0.6, 1.0), (1.0, math.pi / 2)]  # TrigFlow time t (0: clean, pi / 2: noise)


def rms(v: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square over everything but the batch dimension."""
    return v.flatten(1).pow(2).mean(dim=1).sqrt()


def measure(path: str, n: int, seed: int) -> dict[str, list[float]]:
    """Per band: mean over samples of rms(sigma_d dF/dt), rms of its time-input part, rms(g) before normalisation."""
    from difflab.checkpoints import module_from_checkpoint
    from difflab.datamodules.digits import load_digits_tensors
    from difflab.diffusion.consistency import (
        scm_tangent,
        time_derivative,
        trigflow_point,
        trigflow_time,
        trigflow_velocity,
    )
    from difflab.methods.scm import ContinuousConsistency

    module = module_from_checkpoint(path)
    d = module.diffusion
    images, labels = load_digits_tensors(int(d.sample_shape[-1]))
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(images), generator=g)[:n]
    x0, raw = images[rows], labels[rows]  # in [-1, 1], as the datamodule serves them
    cond = d.condition(raw)
    sd = float(d.objective.sigma_data)
    sigma = (torch.randn(n, generator=g, dtype=torch.float64) * 1.4 - 1.0).exp()
    t = trigflow_time(sigma, sd).float()
    eps = torch.randn(x0.shape, generator=g)
    x = trigflow_point(x0, eps, t, sd)
    dx_dt = trigflow_velocity(x0, eps, t, sd)

    def F(x_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        return ContinuousConsistency.trigflow_output(d, module, x_, t_, cond)

    with torch.no_grad():
        F_minus, dF_dt = time_derivative(F, x, t, dx_dt)
        _, dF_dt_time = time_derivative(F, x, t, torch.zeros_like(dx_dt))
    tangent = scm_tangent(F_minus, dF_dt, x, dx_dt, t, sd)
    out: dict[str, list[float]] = {"dF": [], "dF_time": [], "g": [], "count": []}
    for lo, hi in BANDS:
        m = (t >= lo) & (t < hi)
        out["count"].append(float(m.sum()))
        for key, v in (("dF", sd * dF_dt), ("dF_time", sd * dF_dt_time), ("g", tangent)):
            out[key].append(float(rms(v[m]).mean()) if m.any() else float("nan"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="NAME=<checkpoint>")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="scm_tangent")
    args = p.parse_args()
    set_threads(args.threads)
    bands = [f"t in [{lo:.1f}, {hi:.2f})" for lo, hi in BANDS]
    rows = []
    for spec in args.checkpoints:
        name, _, path = spec.partition("=")
        if not path:
            p.error(f"checkpoint '{spec}' is not NAME=<path>")
        r = measure(path, args.n, args.seed)
        for key, label in (("dF", "sigma_d dF/dt"), ("dF_time", "its time-input part"), ("g", "tangent g")):
            rows.append([name, label, *[f"{v:.3g}" for v in r[key]]])
        print(f"[scm-tangent] {name}: {shown_path(Path(path))} done")
    counts = "samples per band: " + ", ".join(f"{int(c)}" for c in r["count"])
    text = "\n".join(
        [
            "# sCM's time derivative through trained digits denoisers",
            "",
            f"`PYTHONPATH=. python bench/bench_scm_tangent.py {' '.join(args.checkpoints)} --n {args.n}`: "
            f"{args.n} training digits at sCM's noise levels (lognormal(-1, 1.4)), the data's velocity as dx/dt, one "
            f"forward-mode pass; root-mean-square per sample, averaged in each band of TrigFlow time ({counts}).",
            "",
            md_table(["checkpoint", "quantity", *bands], rows),
            "",
            f"Machine: {machine_description()}",
        ]
    )
    print(f"wrote {write_result(args.name, text)}")


if __name__ == "__main__":
    main()
