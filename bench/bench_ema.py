"""EMA update cost as a fraction of the training step, through the EMA callback's own update path.

The digits recipe's DiffusionModule and its EMA callback (``configs/callbacks/default.yaml: ema``) are built from the
composed config; the callback's ``setup`` makes the averaged copy and each timed update calls
``EMA.on_train_batch_end`` with an advancing step counter, i.e. the schedule check and one ``torch._foreach_lerp_``
over tensor lists cached on the first update (``EMA._update``). The training step it is compared with (label dropout,
loss, backward, grad clipping, AdamW) runs in the same process; the two are timed alternately, medians reported.

    PYTHONPATH=. python bench/bench_ema.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    compose_train,
    interleaved,
    machine_description,
    md_table,
    median,
    set_threads,
    time_calls,
    write_result,
)


def build(out_dir: str):
    """(module, EMA callback with its average built, a batch, the trainer's clip value) for the digits recipe."""
    from hydra.utils import instantiate

    from difflab.pipeline import fill_from_datamodule

    cfg = compose_train(["experiment=digits"], out_dir)
    dm = instantiate(cfg.datamodule)
    fill_from_datamodule(cfg, dm)
    dm.setup("fit")
    model = instantiate(cfg.model).train()
    ema = instantiate(cfg.callbacks.ema)
    ema.setup(None, model, "fit")
    batch = next(iter(dm.train_dataloader()))
    return model, ema, batch, float(cfg.trainer.gradient_clip_val or 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 5; 2 quick)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one EMA update")
    args = p.parse_args()
    set_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    n_step, n_ema = (2, 20) if args.quick else (5, 200)
    with tempfile.TemporaryDirectory(prefix="bench_ema_") as d:
        model, ema, batch, clip = build(d)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = model.optimizer_factory(params, lr=model.lr)
    trainer = SimpleNamespace(global_step=0)

    def train_step():
        loss = model.diffusion.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    def ema_update():
        trainer.global_step += 1
        ema.on_train_batch_end(trainer, model, None, batch, 0)

    train_step()
    ema_update()
    times = interleaved(
        {"step": lambda: time_calls(train_step, n_step), "ema": lambda: time_calls(ema_update, n_ema)}, repeats
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                ema_update()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    step_s, ema_s = median(times["step"]), median(times["ema"])
    frac = ema_s / step_s
    n_tensors = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
    n_el = sum(p.numel() for p in model.parameters())
    rows = [
        [
            "training step (loss, backward, clip, AdamW)",
            f"{step_s * 1e3:.1f}",
            " / ".join(f"{x * 1e3:.0f}" for x in times["step"]),
        ],
        [
            f"EMA update (callback path; {n_tensors} tensors, {n_el / 1e6:.2f}M params)",
            f"{ema_s * 1e3:.2f}",
            " / ".join(f"{x * 1e3:.2f}" for x in times["ema"]),
        ],
    ]
    text = "\n".join(
        [
            "# EMA update cost" + (" (quick)" if args.quick else ""),
            "",
            f"`PYTHONPATH=. python bench/bench_ema.py{' --quick' if args.quick else ''}`: digits recipe, batch "
            f"{batch['x'].shape[0]}, EMA decay {ema.decay}, update every {ema.update_every} step(s); "
            f"{repeats} alternating rounds ({n_step} steps / {n_ema} EMA updates each), medians, {args.threads} torch thread(s).",
            "",
            md_table(["work", "ms (median)", "per round (ms)"], rows),
            "",
            f"EMA cost = {frac:.2%} of the training step; target <= 2%: {'met' if frac <= 0.02 else 'not met'}.",
            "",
            f"Machine: {machine_description()}",
        ]
    )
    print(text)
    print("wrote", write_result("ema", text, args.quick))


if __name__ == "__main__":
    main()
