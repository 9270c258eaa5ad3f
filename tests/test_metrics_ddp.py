"""FrechetMetric under DDP: 2 CPU processes (gloo) each stream half the data; the synced FD / KID and the saved
real-stats cache equal the single-process results over the whole data."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from difflab.metrics.feature_metrics import FrechetMetric

KEY = {"dataset": "toy", "split": "train", "resolution": 8}
N_REAL, N_FAKE = 64, 50
FAKE_SPLIT = 30  # uneven shards: rank 0 gets 30 fakes, rank 1 gets 20


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(N_REAL, 6, generator=gen, dtype=torch.float64)
    fake = torch.randn(N_FAKE, 6, generator=gen, dtype=torch.float64) * 1.2 + 0.3
    return real, fake


def _metric() -> FrechetMetric:
    torch.manual_seed(0)  # the same fixed random feature layer in every process
    return FrechetMetric(nn.Linear(6, 4).double(), 4, feature_name="lin", kid_subsets=5, kid_subset_size=16)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        real, fake = _data()
        # contiguous shards in rank order, so the gathered KID features keep the single-process order
        my_real = real[: N_REAL // 2] if rank == 0 else real[N_REAL // 2 :]
        my_fake = fake[:FAKE_SPLIT] if rank == 0 else fake[FAKE_SPLIT:]
        metric = _metric()
        for chunk in my_real.split(12):
            metric.update(chunk, real=True)
        for chunk in my_fake.split(7):
            metric.update(chunk, real=False)
        result = {k: v.cpu() for k, v in metric.compute().items()}
        result["local_real_count"] = metric.real_count.clone()  # states are un-synced again after compute
        metric.save_real_stats(os.path.join(out_dir, "real_stats.pt"), KEY)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_synced_metric_equals_single_process(tmp_path):
    ctx = mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 120 s")

    real, fake = _data()
    single = _metric()
    single.update(real, real=True)
    single.update(fake, real=False)
    expected = single.compute()
    assert float(expected["frechet"]) > 0.05

    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k, v in expected.items():
            assert float(got[k]) == pytest.approx(float(v), rel=1e-6), (rank, k)
        assert int(got["local_real_count"]) == N_REAL // 2

    cache = torch.load(tmp_path / "real_stats.pt", weights_only=True)
    stats = single.real_statistics()
    assert cache["count"] == N_REAL
    assert torch.allclose(cache["mean"], stats["mean"], rtol=1e-10)
    assert torch.allclose(cache["cov"], stats["cov"], rtol=1e-10)
    assert torch.equal(cache["features"], stats["features"].float())
