"""Few-step distillation math on tensors: progressive distillation's target and weighting (Salimans & Ho 2022,
arXiv 2202.00512) on any affine path x_t = alpha x0 + sigma eps, and the step grids it distils along.

A DDIM step from t to s is x_s = alpha_s x0_hat + sigma_s eps_hat. The student takes one such step where the teacher
takes two (t -> mid -> s); with eps_hat = (x_t - alpha_t x0_hat) / sigma_t its one step lands on the teacher's x_s
exactly when x0_hat is ``progressive_target``.
"""

from __future__ import annotations

import torch

from difflab.diffusion.processes import NoiseProcess, Spacing

Tensor = torch.Tensor


def progressive_target(
    x_t: Tensor, x_s: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor
) -> Tensor:
    """The x0 whose single DDIM step from x_t at (alpha_t, sigma_t) reaches x_s at (alpha_s, sigma_s)
    (Salimans & Ho 2022, Algorithm 2): (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t).
    At a clean end (sigma_s = 0, alpha_s = 1) it is x_s itself."""
    ratio = sigma_s / sigma_t
    return (x_s - ratio * x_t) / (alpha_s - ratio * alpha_t)


def truncated_snr_weight(alpha: Tensor, sigma: Tensor) -> Tensor:
    """max(snr, 1) on x0 errors (Salimans & Ho 2022, section 4: 'truncated SNR'): the eps loss at high SNR, the x0
    loss where the noise dominates (the eps loss would vanish there)."""
    return ((alpha / sigma) ** 2).clamp(min=1.0)


def halving_grid(process: NoiseProcess, student_steps: int, spacing: Spacing = None) -> Tensor:
    """The teacher's descending grid of 2 N steps (2 N + 1 process times ending at clean data) whose every other time
    is the student's N-step grid (``spacing``: the sampler's), so the distilled student samples on the grid it was
    trained on. Refuses a process whose grids are not nested (ValueError naming what to change)."""
    n = int(student_steps)
    teacher = process.sampling_times(2 * n, spacing).to(torch.float64)
    student = process.sampling_times(n, spacing).to(torch.float64)
    if student.shape[0] != n + 1 or not torch.allclose(teacher[::2], student, rtol=1e-9, atol=1e-9):
        raise ValueError(
            f"progressive distillation needs nested sampling grids: process {process.name}'s {n}-step grid is not "
            f"every other time of its {2 * n}-step grid (flow: set process.t_min=0; vp: spacing trailing; "
            "edm's grid does not halve)"
        )
    return teacher
