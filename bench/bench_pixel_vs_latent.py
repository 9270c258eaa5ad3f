"""Training images/second of pixel vs latent diffusion at STL10 shape (issue 6).

Pixel: the stl10_vpred_cfg UNet on 3x96x96 images. Latent: the stl10_latent UNet on 4x24x24 cached latents (what a
4x-down-sampling KL autoencoder gives; the cache is read, not encoded, so no autoencoder runs while training). Both
sides take the same full training step (forward, v-prediction loss, backward, AdamW), alternating, medians reported.
`python bench/bench_pixel_vs_latent.py [--quick] [--batch 8] [--steps 3]`
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from difflab.configs import CONFIG_DIR
from difflab.diffusion.objectives import Objective
from difflab.diffusion.processes import VPProcess
from difflab.models.unet2d import UNet2D

ROOT = Path(__file__).resolve().parents[1]


def recipe_net(experiment: str, quick: bool) -> tuple[UNet2D, tuple[int, ...]]:
    """The denoiser an experiment trains, with its input shape (quick: quarter width)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    kw = {k: v for k, v in cfg.model.net.items() if not k.startswith("_")}
    kw["channel_mults"], kw["attention_levels"] = list(kw["channel_mults"]), list(kw["attention_levels"])
    kw.pop("cross_attention_levels", None)
    if quick:
        kw["base_channels"] //= 4
        kw["head_dim"] = min(kw.get("head_dim", 32), kw["base_channels"])
    shape = (3, 96, 96) if experiment == "stl10_vpred_cfg" else (4, 24, 24)
    return UNet2D(cond_dim=128, **kw), shape


def step_seconds(net: UNet2D, shape, batch: int, steps: int) -> list[float]:
    """Seconds per full training step."""
    opt = torch.optim.AdamW(net.parameters(), 2e-4)
    sched, obj = VPProcess("cosine", 500), Objective("v")
    x0, cond = torch.randn(batch, *shape), torch.randn(batch, 128)
    out = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = obj.losses(lambda x, t: net(x, t.float(), cond), x0, sched)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # first step warms up
            out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pixel_vs_latent.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    nets = {name: recipe_net(name, args.quick) for name in ("stl10_vpred_cfg", "stl10_latent")}
    times = {name: [] for name in nets}
    for _ in range(args.rounds):
        for name, (net, shape) in nets.items():
            times[name] += step_seconds(net, shape, args.batch, args.steps)
    rows = []
    for name, (net, shape) in nets.items():
        med = statistics.median(times[name])
        rows.append(
            (name, "x".join(map(str, shape)), sum(p.numel() for p in net.parameters()) / 1e6, med, args.batch / med)
        )
    speedup = rows[1][4] / rows[0][4]
    lines = [
        f"# Pixel vs latent diffusion training speed at STL10 shape{' (quick: quarter width)' if args.quick else ''}",
        "",
        f"`python bench/bench_pixel_vs_latent.py`: batch {args.batch}, {args.steps} steps x {args.rounds} alternating "
        f"rounds, median; torch threads {torch.get_num_threads()}, CPU.",
        "",
        "| recipe | input | params (M) | s / step | images / s |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {n} | {s} | {p:.1f} | {m:.3f} | {ips:.2f} |" for n, s, p, m, ips in rows]
    lines += [
        "",
        f"Latent training throughput = {speedup:.1f}x pixel (the latent cache is read, never encoded, while training).",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
