"""Memory per GPU and training throughput of a DiT under DDP vs FSDP2 (``trainer=fsdp``'s sharding): DiT-B/2 (or L/2,
XL/2) on 256 px images' latents (32x32x4), class-conditional, bf16, AdamW and an EMA of the weights, on all GPUs.

    python bench/bench_fsdp_gpu.py [--size B] [--patch 2] [--batch 32] [--steps 20] [--world N] [--modes ddp,fsdp]
    python bench/bench_fsdp_gpu.py --smoke      # the same code path on the CPU: 2 gloo processes, a tiny DiT

Each mode runs in its own ``world`` processes (one per GPU, NCCL) with the same per-GPU batch. DDP: the whole model,
its gradients, AdamW state and EMA on every GPU; autocast bf16. FSDP: ``difflab.ops.fsdp.shard_module`` (each block
its own unit, the denoiser's rest and the class embedding at their roots), ``MixedPrecisionPolicy`` bf16 parameters /
fp32 reductions (as ``trainer=fsdp`` with ``precision=bf16-mixed``), the EMA kept as local shards and updated with
``torch._foreach_lerp_`` (as ``difflab.callbacks.ema.EMA`` under FSDP). Reported per mode: img/s over all GPUs, the
peak memory allocated on the busiest GPU and the memory held between steps (weights, gradients, optimizer state,
EMA). Writes bench/results/fsdp_gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine_description, md_table, write_result  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Holder(torch.nn.Module):
    """The two trained parts as ``DiffusionModule`` names them (``denoiser``, ``conditioner``)."""

    def forward(self, x, t, y):
        return self.denoiser(x, t, self.conditioner(y)["vector"])


def build(args):
    """DiT + class embedding (seeded: every rank and mode starts from the same weights), on the CPU."""
    from difflab.conditioning.base import ClassConditioner
    from difflab.models.dit import PRESETS, DiT

    torch.manual_seed(0)
    hidden = args.hidden or PRESETS[args.size][1]
    holder = Holder()
    holder.denoiser = DiT(
        (4, args.latent, args.latent),
        size=args.size,
        patch_size=args.patch,
        cond_dim=hidden,
        depth=args.depth,
        hidden_dim=args.hidden,
        num_heads=args.heads,
    )
    holder.conditioner = ClassConditioner(num_classes=1000, embed_dim=hidden)
    return holder


def worker(rank: int, mode: str, args, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = not args.smoke
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.world)
    try:
        holder = build(args)
        params = sum(p.numel() for p in holder.parameters())
        if mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            from difflab.ops.fsdp import local, mixed_precision_policy, shard_module

            mesh = init_device_mesh(device.type, (args.world,))
            shard_module(holder, mesh, mixed_precision_policy("bf16-mixed" if cuda else "32-true"))
            holder.to(device)
            model = holder
            ema = [local(p).detach().clone() for p in holder.parameters()]

            def current():
                return [local(p).detach() for p in holder.parameters()]
        else:
            from torch.nn.parallel import DistributedDataParallel

            holder.to(device)
            model = DistributedDataParallel(holder, device_ids=[rank] if cuda else None)
            ema = [p.detach().clone() for p in holder.parameters()]

            def current():
                return [p.detach() for p in holder.parameters()]

        opt = torch.optim.AdamW([p for p in holder.parameters()], lr=1e-4, foreach=True)
        g = torch.Generator(device=device).manual_seed(rank)
        x = torch.randn(args.batch, 4, args.latent, args.latent, generator=g, device=device)
        t = torch.randint(0, 1000, (args.batch,), generator=g, device=device)
        y = torch.randint(0, 1000, (args.batch,), generator=g, device=device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = (model(x, t, y).float() - x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(ema, current(), 1e-3)

        def sync():
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()

        for _ in range(args.warmup):
            step()
        sync()
        held = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        per_step = (time.perf_counter() - t0) / args.steps
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        stats = [None] * args.world
        dist.all_gather_object(stats, {"per_step": per_step, "peak": peak, "held": held, "params": params})
        if rank == 0:
            Path(out).write_text(json.dumps(stats))
        dist.barrier()  # no rank tears gloo down while another is still in a collective (SIGABRT at exit)
    finally:
        dist.destroy_process_group()
    # Done and torn down: leave without the interpreter's own exit, where gloo's leftover threads can still abort the
    # process ("terminate called without an active exception", seen once in about ten CPU runs of the smoke test).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_mode(mode: str, args) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "stats.json")
        mp.spawn(worker, args=(mode, args, free_port(), out), nprocs=args.world, join=True)
        stats = json.loads(Path(out).read_text())
    per_step = max(s["per_step"] for s in stats)
    return {
        "img_s": args.world * args.batch / per_step,
        "peak": max(s["peak"] for s in stats),
        "held": max(s["held"] for s in stats),
        "params": stats[0]["params"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="B")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="per GPU")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--world", type=int, default=None, help="processes (default: every visible GPU)")
    p.add_argument("--modes", default="ddp,fsdp")
    p.add_argument("--smoke", action="store_true", help="CPU, 2 gloo processes, a 2-block DiT on 8x8 latents")
    args = p.parse_args()
    args.depth = args.hidden = args.heads = None
    if args.smoke:
        args.size, args.patch, args.latent, args.batch, args.steps, args.warmup = "T", 4, 8, 2, 2, 1
        args.depth, args.hidden, args.heads, args.world = 2, 32, 2, 2
    elif not torch.cuda.is_available():
        sys.exit("error: bench_fsdp_gpu.py needs CUDA GPUs (use --smoke to test the code path on a CPU)")
    args.world = args.world or torch.cuda.device_count()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("ddp", "fsdp")]
    if bad:
        sys.exit(f"error: --modes takes ddp and/or fsdp, not {', '.join(bad)}")
    results = {m: run_mode(m, args) for m in modes}
    gib = (lambda b: f"{b / 2**30:.2f} GiB") if not args.smoke else (lambda b: "n/a (CPU)")
    rows = [
        [
            m,
            f"DiT-{args.size}/{args.patch}",
            f"{r['params'] / 1e6:.1f}M",
            args.world,
            args.batch,
            f"{r['img_s']:.3g}",
            gib(r["held"]),
            gib(r["peak"]),
        ]
        for m, r in results.items()
    ]
    name = torch.cuda.get_device_name(0) if not args.smoke else "CPU (smoke run, gloo)"
    text = "\n".join(
        [
            "# DDP vs FSDP2: memory per GPU and throughput" + (" (smoke run on CPU)" if args.smoke else ""),
            "",
            f"`python bench/bench_fsdp_gpu.py --size {args.size} --patch {args.patch} --batch {args.batch} --steps "
            f"{args.steps} --world {args.world}` on {args.world} x {name}; {args.latent}x{args.latent}x4 latents, "
            "class-conditional, AdamW + EMA, "
            + (
                "fp32 (smoke run)"
                if args.smoke
                else "bf16 (DDP: autocast; FSDP: bf16 gathered weights, fp32 reductions)"
            )
            + ".",
            "",
            md_table(
                [
                    "mode",
                    "model",
                    "params",
                    "GPUs",
                    "batch/GPU",
                    "img/s (all GPUs)",
                    "held between steps",
                    "peak allocated",
                ],
                rows,
            ),
            "",
            "held between steps = weights + gradients + AdamW state + EMA (+ allocator caches of the last step) on the "
            "busiest GPU.",
            "",
            f"Machine: {machine_description()}",
        ]
    )
    print(text)
    print(write_result("fsdp_gpu", text, quick=args.smoke))


if __name__ == "__main__":
    main()
