"""Consistency training math on tensors (Song et al. 2023, arXiv 2303.01469; improved training, iCT: Song & Dhariwal
2023, arXiv 2310.14189; easy consistency tuning, ECT: Geng et al. 2024, arXiv 2406.14548) on any affine path.

A consistency model maps any point of an ODE trajectory to its clean end: f(x_t, t) = x0. difflab's consistency
function is the denoiser's x0 estimate (exact at t = 0 for flow and v / eps targets: the boundary condition holds by
construction). Training pulls f(x_t, t) towards a stopped-gradient f(x_r, r) at a slightly earlier time r on the same
trajectory; the gap t - r shrinks as training goes (ECT's stages). Noise levels are EDM's sigma = sigma / alpha of the
path (``NoiseProcess.sigma_ve_at``), so one schedule serves every process.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

Tensor = torch.Tensor


def ect_earlier_sigma(sigma_t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's mapping from sigma_t to the earlier sigma_r at training ``stage`` (0, 1, ...): r = t (1 - q^-(stage+1)
    (1 + k sigmoid(-b t))), clamped at 0 (locuslab/ect ``t_to_r_sigmoid``): the gap halves each stage (q = 2) and is
    widest at small sigma."""
    decay = q ** -(stage + 1)
    return (sigma_t * (1 - decay * (1 + k * torch.sigmoid(-b * sigma_t)))).clamp(min=0)


def ict_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant for data of ``dim`` values: 0.00054 sqrt(dim) (0.03 on 32x32x3)."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(squared_norm: Tensor, c: float) -> Tensor:
    """sqrt(||d||^2 + c^2) - c (iCT's metric; c = 0: the L2 norm itself, ECT's default)."""
    return (squared_norm + c * c).sqrt() - c if c > 0 else squared_norm.sqrt()


def consistency_loss(f_t: Tensor, f_r: Tensor, sigma_t: Tensor, sigma_r: Tensor, c: float) -> Tensor:
    """Per-sample ECT loss: pseudo_huber(||f_t - f_r||^2 summed over each sample, c) / (sigma_t - sigma_r)."""
    squared = ((f_t - f_r) ** 2).flatten(1).sum(dim=1)
    return pseudo_huber(squared, c) / (sigma_t - sigma_r).flatten()


def time_derivative(
    f: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, dx_dt: Tensor
) -> tuple[Tensor, Tensor]:
    """(f(x, t), df/dt) along a trajectory moving at ``dx_dt``: one forward-mode pass (``torch.func.jvp`` with
    tangents (dx_dt, 1)), the derivative continuous-time consistency (sCM) and MeanFlow targets need. Attention runs
    on SDPA's math backend inside: the fused flash / memory-efficient kernels have no forward-mode derivative."""
    with sdpa_kernel(SDPBackend.MATH):
        out, tangent = torch.func.jvp(f, (x, t), (dx_dt, torch.ones_like(t)))[:2]  # no aux output asked for
    return out, tangent
