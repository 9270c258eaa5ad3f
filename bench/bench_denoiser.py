"""Denoiser throughput: difflab UNet2D vs diffusers UNet2DModel at matched width, depth and attention.

Images per second for one training step (forward, MSE loss, backward, AdamW step) at 16x16x1, 32x32x3 and 64x64x3,
in fp32 and under bf16 autocast. The two networks are built from the same description:

- widths ``base * mults`` per level  <->  ``block_out_channels``;
- ``num_res_blocks`` residual blocks per down level and one more per up level  <->  ``layers_per_block`` (diffusers
  also uses layers_per_block + 1 on the way up);
- self-attention after each residual block of ``attention_levels`` and in the middle (res-attn-res)  <->
  ``AttnDownBlock2D`` / ``AttnUpBlock2D`` at those levels, ``UNetMidBlock2D``;
- GroupNorm groups, attention head width 32, time embedding width 4 x base, scale-shift time conditioning
  (``resnet_time_scale_shift="scale_shift"``), strided-conv downsampling, nearest + conv upsampling;
- unconditional (no class table on either side: its cost is negligible).

The network description is the digits recipe's ``model.net`` composed by Hydra at run time (``--net recipe``), or the
vs-diffusers baseline widths (32, 64, 64) with attention at the lowest level (``--net baseline``). Both sides are timed
in the same process, alternating every round; medians of ``--repeats`` rounds.

    PYTHONPATH=. python bench/bench_denoiser.py [--quick] [--threads 1] [--net recipe baseline]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    REPO,
    has_native_bf16,
    interleaved,
    machine_description,
    md_table,
    median,
    set_threads,
    time_calls,
    write_result,
)

SHAPES = [((1, 16, 16), 64), ((3, 32, 32), 32), ((3, 64, 64), 16)]  # (C, H, W), batch size
BASELINE_NET = {
    "base_channels": 32,
    "channel_mults": [1, 2, 2],
    "num_res_blocks": 1,
    "attention_levels": [2],
    "groups": 8,
    "head_dim": 32,
}


def recipe_net() -> dict:
    """The digits recipe's UNet2D arguments, composed from the Hydra configs exactly as train.py would."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "train", overrides=["experiment=digits", "paths.output_dir=/tmp/unused", f"paths.root_dir={REPO}"]
        )
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    return {
        k: net[k]
        for k in ("base_channels", "channel_mults", "num_res_blocks", "attention_levels", "groups", "head_dim")
    }


def build_pair(net: dict, in_ch: int, size: int):
    """(difflab UNet2D, diffusers UNet2DModel) built from the same description."""
    from diffusers import UNet2DModel

    from difflab.models.unet2d import UNet2D

    ours = UNet2D(
        in_channels=in_ch,
        base_channels=net["base_channels"],
        channel_mults=net["channel_mults"],
        num_res_blocks=net["num_res_blocks"],
        attention_levels=net["attention_levels"],
        groups=net["groups"],
        head_dim=net["head_dim"],
    )
    widths = tuple(net["base_channels"] * m for m in net["channel_mults"])
    att = set(net["attention_levels"])
    down = tuple("AttnDownBlock2D" if i in att else "DownBlock2D" for i in range(len(widths)))
    up = tuple("AttnUpBlock2D" if i in att else "UpBlock2D" for i in reversed(range(len(widths))))
    theirs = UNet2DModel(
        sample_size=size,
        in_channels=in_ch,
        out_channels=in_ch,
        block_out_channels=widths,
        layers_per_block=net["num_res_blocks"],
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=net["groups"],
        attention_head_dim=net["head_dim"],
        resnet_time_scale_shift="scale_shift",
        downsample_type="conv",
        upsample_type="conv",
    )
    return ours, theirs


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def train_step_fn(model, kind: str, x: torch.Tensor, t: torch.Tensor, target: torch.Tensor, bf16: bool):
    """A closure running one full training step (forward, loss, backward, AdamW) of model."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t) if kind == "difflab" else model(x, t).sample
            loss = F.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure(net: dict, shape, batch: int, bf16: bool, steps: int, repeats: int) -> dict:
    """Median seconds per training step for both networks at one shape and precision (alternating rounds)."""
    c, h, w = shape
    torch.manual_seed(0)
    ours, theirs = build_pair(net, c, h)
    x, target = torch.randn(batch, c, h, w), torch.randn(batch, c, h, w)
    t = torch.randint(0, 1000, (batch,)).float()
    fns = {
        "difflab": train_step_fn(ours, "difflab", x, t, target, bf16),
        "diffusers": train_step_fn(theirs, "diffusers", x, t, target, bf16),
    }
    for f in fns.values():  # warm-up (allocator, oneDNN primitive caches)
        f()
    times = interleaved({k: (lambda f=f: time_calls(f, steps)) for k, f in fns.items()}, repeats)
    return {
        "params": {"difflab": n_params(ours), "diffusers": n_params(theirs)},
        "s": {k: median(v) for k, v in times.items()},
        "batch": batch,
    }


def render(rows, fp32_ratio, nets, args, steps, repeats, partial: bool = False) -> str:
    """The result markdown (``partial`` while rows are still being measured, so a long run leaves results)."""
    worst = min(fp32_ratio.values())
    net_desc = "; ".join(f"{k}: {v}" for k, v in nets.items())
    text = "\n".join(
        [
            "# Denoiser training throughput: difflab UNet2D vs diffusers UNet2DModel"
            + (" (quick)" if args.quick else "")
            + (" (partial: still running)" if partial else ""),
            "",
            f"`PYTHONPATH=. python bench/bench_denoiser.py{' --quick' if args.quick else ''}`: images/s of one training "
            f"step (forward + MSE + backward + AdamW), median of {repeats} alternating rounds of {steps} steps, "
            f"{args.threads} torch thread(s). Networks: {net_desc}. diffusers is built with the same widths "
            f"(block_out_channels), layers_per_block = num_res_blocks, Attn blocks at the same levels, the same groups and "
            f"head width, scale-shift time conditioning; both unconditional. Params are difflab / diffusers.",
            "",
            md_table(
                [
                    "net",
                    "shape",
                    "batch",
                    "precision",
                    "params",
                    "difflab img/s",
                    "diffusers img/s",
                    "difflab / diffusers",
                    "bf16 speed vs fp32 (difflab)",
                ],
                rows,
            ),
            "",
            f"Target UNet2D fp32 throughput >= 1.0x diffusers: {'met' if worst >= 1.0 else 'not met'} "
            f"(lowest ratio {worst:.2f}). bf16 autocast on this CPU: "
            f"{'native bf16 present' if has_native_bf16() else 'no native bf16 instructions, so autocast only adds casts; the default CPU precision stays fp32'}.",
            "",
            f"Machine: {machine_description()}",
        ]
    )
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16x16x1 only, 2 steps x 2 rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--steps", type=int, default=None, help="training steps per timed round (default 5; 2 quick)")
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 3; 2 quick)")
    p.add_argument(
        "--net",
        nargs="+",
        default=None,
        choices=["recipe", "baseline"],
        help="network descriptions to compare (default: recipe baseline; recipe with --quick)",
    )
    p.add_argument("--no-bf16", action="store_true", help="fp32 only")
    args = p.parse_args()
    set_threads(args.threads)
    steps = args.steps or (2 if args.quick else 5)
    repeats = args.repeats or (2 if args.quick else 3)
    shapes = SHAPES[:1] if args.quick else SHAPES
    nets = {
        n: (recipe_net() if n == "recipe" else BASELINE_NET)
        for n in (args.net or (["recipe"] if args.quick else ["recipe", "baseline"]))
    }
    precisions = [False] if args.no_bf16 else [False, True]
    rows, fp32_ratio = [], {}
    for net_name, net in nets.items():
        for shape, batch in shapes:
            per_prec = {}
            for bf16 in precisions:
                r = measure(net, shape, batch, bf16, steps, repeats)
                per_prec[bf16] = r
                ips = {k: batch / s for k, s in r["s"].items()}
                ratio = ips["difflab"] / ips["diffusers"]
                if not bf16:
                    fp32_ratio[(net_name, shape)] = ratio
                bf16_vs = "" if not bf16 else f"{per_prec[False]['s']['difflab'] / r['s']['difflab']:.2f}x"
                rows.append(
                    [
                        net_name,
                        "x".join(map(str, shape)),
                        batch,
                        "bf16 autocast" if bf16 else "fp32",
                        f"{r['params']['difflab'] / 1e6:.3f}M / {r['params']['diffusers'] / 1e6:.3f}M",
                        f"{ips['difflab']:.1f}",
                        f"{ips['diffusers']:.1f}",
                        f"{ratio:.2f}",
                        bf16_vs,
                    ]
                )
                print(rows[-1], flush=True)
                write_result("denoiser", render(rows, fp32_ratio, nets, args, steps, repeats, partial=True), args.quick)
    text = render(rows, fp32_ratio, nets, args, steps, repeats)
    print(text)
    print("wrote", write_result("denoiser", text, args.quick))


if __name__ == "__main__":
    main()
