"""Collectives that work with or without a process group: rank and world size, sums over ranks, rank 0's flag."""

from __future__ import annotations

import torch


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity when not distributed); returns a new tensor."""
    t = t.clone()
    if dist_info()[1] > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's boolean, on every rank (so that all ranks take the same branch, e.g. 'the cache exists')."""
    if dist_info()[1] == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def barrier() -> None:
    if dist_info()[1] > 1:
        torch.distributed.barrier()
