"""Training step time of the video denoisers: UNet3D (experiment=sign_text2video) vs ViViT (experiment=sign_vivit).

Builds each denoiser exactly as the experiment configures it (Hydra compose; widths of the MiniLM text
conditioner: 384-d pooled vector, 384-d tokens) and times one optimizer step (forward, MSE loss, backward,
AdamW) on random videos at the recipe's shape: batch 2 x 3 x 16 frames x 64 x 64 with 64 text tokens. Text
encoding and data loading are not included (identical for both models). Reports the median of --steps timed
steps after --warmup untimed ones, parameters, and peak GPU memory on CUDA.

--quick uses batch 2 x 3 x 8 x 32 x 32 (seconds on a laptop CPU) and writes video_models_quick.md.

    PYTHONPATH=. python bench/bench_video_models.py [--quick] [--device auto|cpu|cuda] [--steps 5] [--warmup 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXPERIMENTS = {"unet3d": "sign_text2video", "vivit": "sign_vivit"}
TEXT_DIM, TEXT_TOKENS = 384, 64  # MiniLM widths; conditioning.max_length in the experiments


def build_denoiser(experiment: str, channels: int):
    """The experiment's denoiser, built the way the DiffusionModule builds it (with the conditioner's widths)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"experiment={experiment}",
                "paths.output_dir=/tmp/unused",
                "paths.data_dir=/tmp/unused",
                f"paths.root_dir={REPO}",
            ],
        )
    with open_dict(cfg):
        cfg.model.diffusion.sample_shape = [channels, 1, 1, 1]  # only in_channels reads it
    return instantiate(cfg.model.net)(cond_dim=TEXT_DIM, context_dim=TEXT_DIM)


def time_steps(net, shape, device, steps: int, warmup: int) -> dict:
    """Median seconds per optimizer step on random data of ``shape`` (B x C x T x H x W)."""
    g = torch.Generator().manual_seed(0)
    b = shape[0]
    x = torch.randn(shape, generator=g).to(device)
    target = torch.randn(shape, generator=g).to(device)
    t = (torch.rand(b, generator=g) * 999).to(device)
    cond = torch.randn(b, TEXT_DIM, generator=g).to(device)
    ctx = torch.randn(b, TEXT_TOKENS, TEXT_DIM, generator=g).to(device)
    mask = torch.ones(b, TEXT_TOKENS, dtype=torch.bool, device=device)
    mask[:, TEXT_TOKENS // 2 :] = False  # half padding, as for a typical sentence
    net = net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = (net(x, t, cond, ctx, mask) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"median_s": statistics.median(times), "min_s": min(times), "steps": steps}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 2 x 3 x 8 x 32 x 32 instead of 2 x 3 x 16 x 64 x 64")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5, 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, 1 with --quick)")
    ap.add_argument("--out", default=None, help="markdown file (default bench/results/video_models[_quick].md)")
    args = ap.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    shape = (2, 3, 8, 32, 32) if args.quick else (2, 3, 16, 64, 64)
    steps = args.steps or (3 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    rows = []
    for name, experiment in EXPERIMENTS.items():
        torch.manual_seed(0)
        net = build_denoiser(experiment, shape[1])
        n_params = sum(p.numel() for p in net.parameters())
        r = time_steps(net, shape, device, steps, warmup)
        rows.append((name, experiment, n_params, r))
        print(
            f"{name:7s} ({experiment}): {n_params / 1e6:.1f}M params, {r['median_s'] * 1000:.0f} ms/step "
            f"(min {r['min_s'] * 1000:.0f})" + (f", peak {r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else ""),
            flush=True,
        )
    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"# Video denoisers: training step time{' (quick)' if args.quick else ''}",
        "",
        f"`PYTHONPATH=. python bench/bench_video_models.py{' --quick' if args.quick else ''}` -- one optimizer step "
        f"(forward, MSE, backward, AdamW) on random videos of shape {' x '.join(map(str, shape))} (B x C x T x H x W) "
        f"with {TEXT_TOKENS} text tokens of width {TEXT_DIM} (MiniLM); text encoding and data loading excluded. "
        f"Median of {steps} steps after {warmup} warm-up steps.",
        "",
        f"Device: {dev}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
        f"1-min load average at the end {load:.1f} on {os.cpu_count()} cores"
        + (
            " (shared machine: absolute CPU times are noisy, the ratio is the useful number)"
            if device.type == "cpu"
            else ""
        )
        + ".",
        "",
        "| denoiser | experiment | params | ms / step (median) | ms / step (min) | peak GPU memory |",
        "|---|---|---|---|---|---|",
    ]
    for name, experiment, n_params, r in rows:
        mem = f"{r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else "-"
        lines.append(
            f"| {name} | {experiment} | {n_params / 1e6:.1f}M | {r['median_s'] * 1000:.0f} | "
            f"{r['min_s'] * 1000:.0f} | {mem} |"
        )
    ratio = rows[1][3]["median_s"] / rows[0][3]["median_s"]
    lines += ["", f"ViViT / UNet3D step-time ratio: {ratio:.2f}.", ""]
    out = (
        Path(args.out) if args.out else REPO / "bench" / "results" / f"video_models{'_quick' if args.quick else ''}.md"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
