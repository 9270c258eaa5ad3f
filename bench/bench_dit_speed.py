"""DiT training throughput against diffusers' DiTTransformer2DModel, and what the transformer switches buy.

    python bench/bench_dit_speed.py [--size S] [--patch 2] [--latent 32] [--batch 4] [--repeats 5] [--quick]

1. Throughput: one training step (forward, MSE backward, AdamW) of difflab's DiT (+ its class conditioner) and of
   diffusers' ``DiTTransformer2DModel`` at the same configuration (DiT-S/2 on 32x32x4 latents, 1000 classes,
   adaLN-Zero, no learned sigma: 4 output channels), in fp32 and, where the CPU or GPU has native bf16, under bf16
   autocast; timed in interleaved rounds (median), images/s and the ratio (>= 1.0x is the target).
2. Regional compile: ``compile_blocks=true`` (torch.compile of each block) against eager, per-step time after
   warm-up, plus the one-off compile time.
3. Activation checkpointing: bytes of activations saved for the backward pass (measured with
   ``torch.autograd.graph.saved_tensors_hooks``, exact), and the step-time cost.
4. Fused QKV: one projection against three, per-step time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (
    has_native_bf16,
    interleaved,
    machine_description,
    md_table,
    median,
    set_threads,
    time_calls,  # noqa: E402
    write_result,
)


def ours(size: str, patch: int, latent: int, **kw):
    """difflab's DiT with a 1000-class conditioner: a callable (x, t, labels) -> output, and its modules."""
    from difflab.conditioning.base import ClassConditioner
    from difflab.models.dit import PRESETS, DiT

    hidden = PRESETS[size][1]
    net = DiT((4, latent, latent), size=size, patch_size=patch, cond_dim=hidden, **kw)
    labels = ClassConditioner(num_classes=1000, embed_dim=hidden)
    modules = torch.nn.ModuleList([net, labels])
    return (lambda x, t, y: net(x, t, labels(y)["vector"])), modules


def theirs(size: str, patch: int, latent: int):
    """diffusers' DiT at the same size (its default DiT block: adaLN-Zero, GELU-tanh MLP, sin-cos positions)."""
    from diffusers import DiTTransformer2DModel

    from difflab.models.dit import PRESETS

    depth, hidden, heads = PRESETS[size]
    net = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=4,
        out_channels=4,
        num_layers=depth,
        sample_size=latent,
        patch_size=patch,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    )
    return (lambda x, t, y: net(x, timestep=t, class_labels=y).sample), net


def step_timer(fn, modules, args, device, dtype=None, steps=1):
    """A function timing ``steps`` training steps (seconds per step)."""
    modules.to(device).train()
    opt = torch.optim.AdamW(modules.parameters(), lr=1e-4)
    x, t, y = batch(args, device)

    def one():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = (fn(x, t, y).float() - x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return one, lambda: time_calls(one, steps, device=device)


def batch(args, device):
    """Latents, timesteps and class labels of one batch (the same for every model)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.latent, args.latent, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    return x, t, y


def n_params(modules) -> float:
    return sum(p.numel() for p in modules.parameters()) / 1e6


def throughput(args, device) -> tuple[list, list]:
    dtypes = [("fp32", None)] + ([("bf16", torch.bfloat16)] if device.type == "cuda" or has_native_bf16() else [])
    rows, ratios = [], []
    for label, dtype in dtypes:
        torch.manual_seed(0)
        fa, ma = ours(args.size, args.patch, args.latent)
        fb, mb = theirs(args.size, args.patch, args.latent)
        warm_a, time_a = step_timer(fa, ma, args, device, dtype, args.steps)
        warm_b, time_b = step_timer(fb, mb, args, device, dtype, args.steps)
        warm_a(), warm_b()
        res = interleaved({"difflab": time_a, "diffusers": time_b}, args.repeats)
        a, b = median(res["difflab"]), median(res["diffusers"])
        ratios.append((label, b / a))
        rows.append(
            [
                label,
                f"{n_params(ma):.2f}M",
                f"{args.batch / a:.2f}",
                f"{n_params(mb):.2f}M",
                f"{args.batch / b:.2f}",
                f"**{b / a:.2f}x**",
            ]
        )
        print(rows[-1], flush=True)
    return rows, ratios


def options(args, device) -> list:
    """Per-step time of each switch against the default, back to back."""
    rows = []
    torch.manual_seed(0)
    fa, ma = ours(args.size, args.patch, args.latent)
    # activation memory: bytes saved for backward during one forward
    for label, kw in (
        ("activation checkpointing", {"checkpoint_activations": True}),
        ("separate q, k, v projections", {"fused_qkv": False}),
        ("regional compile (compile_blocks)", {"compile_blocks": True}),
    ):
        if label.startswith("regional") and args.no_compile:
            continue
        torch.manual_seed(0)
        fb, mb = ours(args.size, args.patch, args.latent, **kw)
        warm_a, time_a = step_timer(fa, ma, args, device, None, args.steps)
        warm_b, time_b = step_timer(fb, mb, args, device, None, args.steps)
        warm_a()
        t0 = time.perf_counter()
        warm_b()  # compiles, for compile_blocks
        first = time.perf_counter() - t0
        res = interleaved({"default": time_a, "option": time_b}, args.repeats)
        a, b = median(res["default"]), median(res["option"])
        extra = ""
        if "checkpointing" in label:
            sa, sb = saved_bytes(fa, args, device), saved_bytes(fb, args, device)
            extra = f"activations saved for backward {sa / 2**20:.0f} MiB -> {sb / 2**20:.0f} MiB ({sb / sa:.2f}x)"
        elif "compile" in label:
            extra = f"first step (compilation) {first:.1f} s"
        rows.append([label, f"{a * 1e3:.0f}", f"{b * 1e3:.0f}", f"{a / b:.2f}x", extra])
        print(rows[-1], flush=True)
    return rows


def saved_bytes(fn, args, device) -> int:
    """Bytes of tensors autograd keeps for the backward pass of one forward (exact; each storage counted once)."""
    x, t, y = batch(args, device)
    seen: dict[int, int] = {}

    def pack(z):
        seen[z.untyped_storage().data_ptr()] = z.untyped_storage().nbytes()
        return z

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda z: z):
        loss = fn(x, t, y).square().mean()
    loss.backward()
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="S")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="training steps per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: DiT-T/4 on 16x16 latents, 2 repeats")
    args = p.parse_args()
    if args.quick:
        args.size, args.patch, args.latent, args.batch, args.repeats = "T", 4, 16, 2, 2
    set_threads(args.threads)
    device = torch.device(args.device)
    rows, ratios = throughput(args, device)
    opt_rows = options(args, device)
    met = all(r >= 1.0 for _, r in ratios)
    text = "\n".join(
        [
            "# DiT training throughput vs diffusers, and the transformer switches" + (" (quick)" if args.quick else ""),
            "",
            f"`python bench/bench_dit_speed.py --size {args.size} --patch {args.patch} --latent {args.latent} --batch "
            f"{args.batch} --repeats {args.repeats}` on {device.type}: DiT-{args.size}/{args.patch} on {args.latent}x"
            f"{args.latent}x4 latents, 1000 classes, batch {args.batch}; one training step = forward, MSE backward, AdamW. "
            f"Medians of {args.repeats} interleaved rounds.",
            "",
            md_table(
                [
                    "precision",
                    "difflab params",
                    "difflab img/s",
                    "diffusers params",
                    "diffusers img/s",
                    "difflab speed-up",
                ],
                rows,
            ),
            "",
            "diffusers' DiT has more parameters at the same size because every block carries its own timestep and "
            "class embedders (`AdaLayerNormZero`); difflab embeds once and shares it, as the DiT paper does.",
            "",
            "Target training-step throughput >= 1.0x diffusers' DiTTransformer2DModel (every precision): "
            f"{'met' if met else 'not met'} ({', '.join(f'{k} {v:.2f}x' for k, v in ratios)}).",
            "",
            "Switches (fp32, per training step, same model, back to back):",
            "",
            md_table(["option", "default ms", "option ms", "speed vs default", "note"], opt_rows),
            "",
            f"Machine: {machine_description()}",
        ]
    )
    print(write_result("dit_speed", text, args.quick), flush=True)


if __name__ == "__main__":
    main()
