"""DiT training throughput and model FLOPs utilisation (MFU) on a GPU: DiT-B/2 on 256 px images' latents
(32x32x4), bf16 autocast, regional compile (``compile_blocks``), AdamW.

    python bench/bench_dit_gpu.py [--size B] [--patch 2] [--batch 64] [--steps 20] [--peak-tflops N]
    python bench/bench_dit_gpu.py --smoke      # the same code path on the CPU with a tiny model (a test runs it)

MFU = model FLOPs per training step (counted by ``torch.utils.flop_counter.FlopCounterMode`` on one eager step:
forward + backward matmuls and attention) x steps per second / the GPU's peak dense bf16 FLOP/s (a table of common
GPUs; ``--peak-tflops`` for others). Writes bench/results/dit_gpu.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine_description, md_table, sync, write_result  # noqa: E402

# dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, SXM parts without sparsity)
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
}


def peak_tflops(name: str, override: float | None) -> float | None:
    """Peak dense bf16 TFLOP/s of a device by name (None when unknown and not given)."""
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() in name.lower()), None)


def build(args, device):
    from difflab.conditioning.base import ClassConditioner
    from difflab.models.dit import PRESETS, DiT

    hidden = PRESETS[args.size][1]
    net = DiT(
        (4, args.latent, args.latent), size=args.size, patch_size=args.patch, cond_dim=hidden, compile_blocks=False
    )
    labels = ClassConditioner(num_classes=1000, embed_dim=hidden)
    return net.to(device), labels.to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="B")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--smoke", action="store_true", help="CPU, DiT-T/4 on 8x8 latents, 2 steps (tests the code path)")
    args = p.parse_args()
    if args.smoke:
        args.size, args.patch, args.latent, args.batch, args.steps, args.warmup = "T", 4, 8, 2, 2, 1
        args.no_compile = True
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("error: bench_dit_gpu.py needs a CUDA GPU (use --smoke to test the code path on a CPU)")
    else:
        device = torch.device("cuda")
    net, labels = build(args, device)
    params = sum(p.numel() for m in (net, labels) for p in m.parameters())
    opt = torch.optim.AdamW([*net.parameters(), *labels.parameters()], lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, 4, args.latent, args.latent, generator=g, device=device)
    t = torch.randint(0, 1000, (args.batch,), generator=g, device=device)
    y = torch.randint(0, 1000, (args.batch,), generator=g, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = (net(x, t, labels(y)["vector"]).float() - x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()  # eager: the model's FLOPs, independent of what compilation fuses
    flops = counter.get_total_flops()
    compile_s = 0.0
    if not args.no_compile:
        for block in net.blocks:
            block.compile(dynamic=False)
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    per_step = (time.perf_counter() - t0) / args.steps
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (smoke run)"
    peak = peak_tflops(name, args.peak_tflops)
    achieved = flops / per_step / 1e12
    mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a (pass --peak-tflops)"
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "n/a"
    row = [
        f"DiT-{args.size}/{args.patch}",
        f"{params / 1e6:.1f}M",
        f"{args.latent}x{args.latent}x4",
        args.batch,
        "bf16 + regional compile" if not args.no_compile else "bf16 eager",
        f"{args.batch / per_step:.3g}",
        f"{flops / args.batch / 1e9:.1f}",
        f"{achieved:.1f}",
        mfu,
        mem,
    ]
    text = "\n".join(
        [
            "# DiT training throughput and MFU on a GPU" + (" (smoke run on CPU)" if args.smoke else ""),
            "",
            f"`python bench/bench_dit_gpu.py --size {args.size} --patch {args.patch} --batch {args.batch} --steps "
            f"{args.steps}` on {name}; compile time {compile_s:.0f} s (not in the timing). Model FLOPs per training step "
            f"by FlopCounterMode (forward + backward); MFU against a peak of {peak or 'unknown'} TFLOP/s dense bf16.",
            "",
            md_table(
                [
                    "model",
                    "params",
                    "input",
                    "batch",
                    "mode",
                    "img/s",
                    "GFLOP/img (train)",
                    "TFLOP/s",
                    "MFU",
                    "peak memory",
                ],
                [row],
            ),
            "",
            f"Machine: {machine_description()}",
        ]
    )
    print(text)
    print(write_result("dit_gpu", text, quick=args.smoke))


if __name__ == "__main__":
    main()
