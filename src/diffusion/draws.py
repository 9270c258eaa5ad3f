"""Seeded float64 draws for the processes' training densities: on the generator's device, so a seeded run replays
exactly on any device."""

from __future__ import annotations

import torch
from torch.types import Device

Tensor = torch.Tensor


def rng_device(generator: torch.Generator | None, device: Device) -> Device:
    """Where random numbers are drawn: on the generator's device when one is given, else on ``device``."""
    return generator.device if generator is not None else device


def standard_normal(n: int, generator: torch.Generator | None = None, device: Device = None) -> Tensor:
    """``n`` float64 N(0, 1) draws, on ``device``."""
    dev = rng_device(generator, device)
    return torch.randn(n, generator=generator, device=dev, dtype=torch.float64).to(device or dev)


def standard_uniform(n: int, generator: torch.Generator | None = None, device: Device = None) -> Tensor:
    """``n`` float64 U(0, 1) draws, on ``device``."""
    dev = rng_device(generator, device)
    return torch.rand(n, generator=generator, device=dev, dtype=torch.float64).to(device or dev)
