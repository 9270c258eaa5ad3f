"""MeanFlow math on tensors (Geng, Deng, Bai, Kolter & He 2025, arXiv 2505.13447), in difflab's flow convention
z_t = (1 - t) x + t eps (t = 1 is noise), v = eps - x.

The network u(z, r, t) predicts the average velocity over [r, t]; the MeanFlow identity u = v - (t - r) du/dt (the
total derivative along the trajectory at fixed r) gives its regression target from one forward-mode derivative.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def meanflow_times(
    n: int, ratio: float, p_mean: float, p_std: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(t, r) for n samples (float64): two logit-normal(p_mean, p_std) times, t the later; a fraction 1 - ``ratio``
    has r = t (plain flow matching: the instantaneous velocity)."""
    a, b = torch.sigmoid(torch.randn(2, n, generator=generator, dtype=torch.float64) * p_std + p_mean)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    same = torch.rand(n, generator=generator, dtype=torch.float64) >= ratio
    return t, torch.where(same, t, r)


def meanflow_target(v: Tensor, du_dt: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """The MeanFlow identity's target v - (t - r) du/dt (stop its gradient before regressing on it)."""
    gap = (t - r).to(v.dtype).reshape(-1, *([1] * (v.ndim - 1)))
    return v - gap * du_dt


def adaptive_l2(u: Tensor, target: Tensor, p: float = 1.0, c: float = 1e-3) -> Tensor:
    """Per-sample squared error over its values, divided by the stopped-gradient (error + c)^p (MeanFlow's adaptive
    weighting; p = 0: plain squared L2, p = 1: close to a pseudo-Huber loss)."""
    squared = ((u - target) ** 2).flatten(1).sum(dim=1)
    return squared / (squared.detach() + c) ** p


def guided_velocity(v: Tensor, u_cond: Tensor, u_uncond: Tensor, scale: float | Tensor, kappa: float) -> Tensor:
    """MeanFlow's guided instantaneous velocity (its section 4.2 and appendix, the kappa form): omega v + kappa u_c +
    (1 - omega - kappa) u_u with omega = scale (1 - kappa), ``u_c`` / ``u_u`` the network's own conditional and
    unconditional velocities u(z, t, t) (stopped gradient). Its fixed point is classifier-free guidance at ``scale``:
    u_c = u_u + scale (v_c - u_u). ``scale`` may be one per sample; ``kappa`` in [0, 1) (0: v at scale, u_c unused)."""
    s = scale.to(v).reshape(-1, *([1] * (v.ndim - 1))) if isinstance(scale, Tensor) else float(scale)
    omega = s * (1 - kappa)
    return omega * v + kappa * u_cond + (1 - omega - kappa) * u_uncond
