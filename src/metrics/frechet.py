"""Distribution distances on feature vectors: Frechet distance and kernel (KID) distance.

The one place for this math. FID (Inception features), FD in classifier features (digits) and FVD (I3D features)
all call these functions; they only differ in the feature network. Everything is computed in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (N - 1 denominator) of ``features`` (N x D), in float64.

    These are the two moments the Frechet distance compares; N >= 2 is needed for a covariance.
    """
    if features.dim() != 2:
        raise ValueError(f"gaussian_stats expects features of shape N x D, got {tuple(features.shape)}")
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"gaussian_stats needs at least 2 feature vectors to estimate a covariance, got {n}")
    f = features.to(torch.float64)
    mean = f.mean(dim=0)
    centered = f - mean
    cov = centered.T @ centered / (n - 1)
    return mean, cov


def _sqrtm_psd(a: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.mT


def trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """Tr((S1 S2)^(1/2)) for covariance matrices S1, S2, computed stably.

    S1 S2 is not symmetric, but it is similar to R^T S2 R for any factor S1 = R R^T, which is symmetric PSD; the
    trace of the square root is the sum of the square roots of its (real, non-negative) eigenvalues. No complex
    arithmetic. R is the Cholesky factor when S1 is positive definite (cheap), else the symmetric square root
    sqrt(S1) from an eigendecomposition (singular S1, e.g. fewer samples than feature dimensions).
    """
    chol, info = torch.linalg.cholesky_ex(sigma1)
    root1 = chol if int(info) == 0 else _sqrtm_psd(sigma1)
    m = root1.mT @ sigma2 @ root1
    m = (m + m.mT) / 2
    return torch.linalg.eigvalsh(m).clamp(min=0).sqrt().sum()


def _check_stats(mu: Tensor, sigma: Tensor, which: str) -> None:
    if mu.dim() != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"frechet_distance: {which} mean must be D and covariance D x D, got {tuple(mu.shape)} and "
            f"{tuple(sigma.shape)}"
        )


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), as a float64 scalar tensor.

    d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)). This is the quantity reported as FID / FVD.
    """
    _check_stats(mu1, sigma1, "first")
    _check_stats(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: feature widths differ ({mu1.shape[0]} vs {mu2.shape[0]})")
    mu1, mu2 = mu1.to(torch.float64), mu2.to(device=mu1.device, dtype=torch.float64)
    sigma1 = sigma1.to(device=mu1.device, dtype=torch.float64)
    sigma2 = sigma2.to(device=mu1.device, dtype=torch.float64)
    sigma1 = (sigma1 + sigma1.mT) / 2
    sigma2 = (sigma2 + sigma2.mT) / 2
    diff = mu1 - mu2
    return diff.dot(diff) + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product(sigma1, sigma2)


def polynomial_kernel(x: Tensor, y: Tensor, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> Tensor:
    """k(x, y) = (gamma <x, y> + coef0)^degree with gamma = 1 / D by default (the KID kernel)."""
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(x: Tensor, y: Tensor, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> Tensor:
    """Unbiased estimate of MMD^2 between samples x (m x D) and y (n x D) under the polynomial kernel.

    Within-set sums exclude the diagonal (i == j), which is what makes the estimate unbiased (it can be < 0).
    """
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"mmd2_unbiased needs at least 2 samples per set, got {m} and {n}")
    k_xx = polynomial_kernel(x, x, degree, gamma, coef0)
    k_yy = polynomial_kernel(y, y, degree, gamma, coef0)
    k_xy = polynomial_kernel(x, y, degree, gamma, coef0)
    sum_xx = k_xx.sum() - k_xx.diagonal().sum()
    sum_yy = k_yy.sum() - k_yy.diagonal().sum()
    return sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2 * k_xy.sum() / (m * n)


def kernel_inception_distance(
    f1: Tensor,
    f2: Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """KID (Binkowski et al. 2018): mean and std of the unbiased polynomial-kernel MMD^2 over random subsets.

    Each of ``subsets`` rounds draws ``subset_size`` rows without replacement from each set (capped at the smaller
    set's size, as in the StyleGAN2-ADA metric code). The std uses the population formula, as torchmetrics does.
    Pass a seeded CPU ``generator`` for reproducible subsets.
    """
    if f1.dim() != 2 or f2.dim() != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"KID expects N x D features of equal width, got {tuple(f1.shape)} and {tuple(f2.shape)}")
    if subsets < 1:
        raise ValueError(f"KID subsets must be >= 1, got {subsets}")
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {f1.shape[0]} and {f2.shape[0]}")
    f1, f2 = f1.to(torch.float64), f2.to(device=f1.device, dtype=torch.float64)
    scores = []
    for _ in range(subsets):
        i1 = torch.randperm(f1.shape[0], generator=generator)[:m].to(f1.device)
        i2 = torch.randperm(f2.shape[0], generator=generator)[:m].to(f1.device)
        scores.append(mmd2_unbiased(f1[i1], f2[i2], degree, gamma, coef0))
    scores = torch.stack(scores)
    return scores.mean(), scores.std(correction=0)
