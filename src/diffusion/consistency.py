"""Consistency training math on tensors (Song et al. 2023, arXiv 2303.01469; improved training, iCT: Song & Dhariwal
2023, arXiv 2310.14189; easy consistency tuning, ECT: Geng et al. 2024, arXiv 2406.14548) on any affine path.

A consistency model maps any point of an ODE trajectory to its clean end: f(x_t, t) = x0. difflab's consistency
function is the denoiser's x0 estimate (exact at t = 0 for flow and v / eps targets: the boundary condition holds by
construction). Training pulls f(x_t, t) towards a stopped-gradient f(x_r, r) at a slightly earlier time r on the same
trajectory; the gap t - r shrinks as training goes (ECT's stages). Noise levels are EDM's sigma = sigma / alpha of the
path (``NoiseProcess.sigma_ve_at``), so one schedule serves every process.

The continuous-time objective (sCM, Lu & Song 2024, arXiv 2410.11081) is stated in TrigFlow's coordinates:
x = cos(t) x0 + sin(t) sigma_d eps, the network's output F with sigma_d F the predicted dx/dt. Every continuous path
is a rescaling of that one (sigma = sigma_d tan t), so a difflab denoiser of any process yields F (``trigflow_velocity``
of its x0 and eps estimates).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from difflab.diffusion.objectives import uncertainty_weighted

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
    tangents (dx_dt, 1)), the derivative continuous-time consistency (sCM) and MeanFlow targets need. With gradients
    enabled the primal output carries them (one pass for prediction and target). Attention runs on SDPA's math
    backend inside: the fused flash / memory-efficient kernels have no forward-mode derivative."""
    with sdpa_kernel(SDPBackend.MATH):
        out, tangent = torch.func.jvp(f, (x, t), (dx_dt, torch.ones_like(t)))[:2]  # no aux output asked for
    return out, tangent


# ---------------------------------------------------------------- continuous time (sCM, TrigFlow coordinates)
def trigflow_time(sigma: Tensor, sigma_data: float) -> Tensor:
    """TrigFlow's time of EDM noise level sigma: arctan(sigma / sigma_d) (0 at clean data, pi / 2 at pure noise)."""
    return torch.atan(sigma / sigma_data)


def trigflow_point(x0: Tensor, eps: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """x = cos(t) x0 + sin(t) sigma_d eps: TrigFlow's noisy point (unit ``eps``)."""
    c, s = _trig(t, x0)
    return c * x0 + s * sigma_data * eps


def trigflow_velocity(x0: Tensor, eps: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """dx/dt of x = cos(t) x0 + sin(t) sigma_d eps at fixed (x0, eps): cos(t) sigma_d eps - sin(t) x0 (sigma_d F)."""
    c, s = _trig(t, x0)
    return c * sigma_data * eps - s * x0


def scm_tangent(
    F_minus: Tensor, dF_dt: Tensor, x: Tensor, dx_dt: Tensor, t: Tensor, sigma_data: float, warmup: float = 1.0
) -> Tensor:
    """sCM's rearranged tangent g = -cos^2 t (sigma_d F- - dx/dt) - r cos t sin t (x + sigma_d dF-/dt) (Algorithm 1;
    r: the tangent warmup in [0, 1]); the loss pulls F towards F- + g, which is cos(t) df-/dt for f = cos t x -
    sin t sigma_d F."""
    c, s = _trig(t, x)
    return -(c * c) * (sigma_data * F_minus - dx_dt) - warmup * c * s * (x + sigma_data * dF_dt)


def time_input_slope(process: Any, sigma_data: float, p_mean: float, p_std: float) -> float:
    """The steepest |d net_time / dt| over TrigFlow times t of the central 98% of noise levels lognormal(``p_mean``,
    ``p_std``): how fast the denoiser's time input moves along a trajectory, which sCM's time derivative goes through
    (sCM section 4.1 asks for ~1: c_noise(t) = t; flow at ``time_scale`` 1000 gives ~1600 at sigma_d 0.5). NaN for a
    discrete process (its time snaps to steps: no slope)."""
    if not getattr(process, "continuous", True):
        return float("nan")
    z = torch.linspace(-2.3263, 2.3263, 1025, dtype=torch.float64)  # the normal's 1% and 99% quantiles
    sigma = (p_mean + p_std * z).exp()
    t = trigflow_time(sigma, sigma_data)
    net_time = torch.as_tensor(process.net_time(process.time_from_log_snr(-2 * sigma.log())), dtype=torch.float64)
    return float((net_time.diff() / t.diff()).abs().max())


def normalize_tangent(g: Tensor, c: float = 0.1) -> Tensor:
    """sCM's tangent normalisation g / (||g|| + c), per sample: bounds the target's step whatever its scale."""
    norm: Tensor = g.flatten(1).norm(dim=1).reshape(-1, *([1] * (g.ndim - 1)))
    return g / (norm + c)


def scm_loss(F: Tensor, F_minus: Tensor, g: Tensor, logvar: Tensor | float = 0.0) -> Tensor:
    """Per-sample sCM loss with adaptive weighting: e^(-logvar) ||F - F- - g||^2 / D + logvar (w = -logvar, the
    learned uncertainty of EDM2; logvar 0: the plain mean squared error)."""
    return uncertainty_weighted(((F - F_minus - g) ** 2).flatten(1).mean(dim=1), logvar)


def _trig(t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    shape = (-1, *([1] * (like.ndim - 1)))
    return torch.cos(t).to(like.dtype).reshape(shape), torch.sin(t).to(like.dtype).reshape(shape)
