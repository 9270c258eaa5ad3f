"""Data whose optimal denoiser is known in closed form: Gaussians and Gaussian mixtures in R^D.

For x_t = a x0 + s eps (a = alpha(t), s = sigma(t) of any process) and x0 ~ sum_k pi_k N(mu_k, S_k), the
posterior mean (the MMSE denoiser every diffusion objective converges to) is
    E[x0 | x_t] = sum_k w_k(x_t) (mu_k + a S_k (a^2 S_k + s^2 I)^-1 (x_t - a mu_k)),
    w_k(x_t) proportional to pi_k N(x_t; a mu_k, a^2 S_k + s^2 I).
Driving a sampler with it isolates the sampler's own error from the network's (tests and bench_samplers).
Everything is float64; points are rows of an N x D tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from difflab.diffusion.objectives import eps_from_x0, input_scale, training_target

if TYPE_CHECKING:
    import numpy.typing as npt

    from difflab.diffusion.processes import NoiseProcess

Tensor = torch.Tensor


class GaussianMixture:
    """sum_k weights[k] N(means[k], covs[k]) in D dimensions (one component: a plain Gaussian)."""

    def __init__(self, weights: Sequence[float], means: Tensor | npt.ArrayLike, covs: Tensor | npt.ArrayLike) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = covs.to(torch.float64) if isinstance(covs, Tensor) else torch.tensor(covs, dtype=torch.float64)
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covs.shape != (k, d, d):
            raise ValueError(
                f"mixture needs weights K, means K x D, covs K x D x D; got {tuple(self.weights.shape)}, "
                f"{tuple(self.means.shape)}, {tuple(self.covs.shape)}"
            )
        if not torch.isclose(self.weights.sum(), torch.tensor(1.0, dtype=torch.float64)):
            raise ValueError(f"mixture weights must sum to 1, got {self.weights.sum().item()}")
        self.dim = d

    @classmethod
    def gaussian(cls, mean: Tensor | npt.ArrayLike, cov: Tensor | npt.ArrayLike) -> "GaussianMixture":
        """A single Gaussian N(mean, cov)."""
        mean = torch.as_tensor(mean, dtype=torch.float64)
        return cls([1.0], mean[None], torch.as_tensor(cov, dtype=torch.float64)[None])

    @property
    def mean(self) -> Tensor:
        """Mean of the data distribution."""
        return (self.weights[:, None] * self.means).sum(0)

    @property
    def cov(self) -> Tensor:
        """Covariance of the data distribution (within- plus between-component)."""
        m = self.mean
        centred = self.means - m
        between = torch.einsum("k,ki,kj->ij", self.weights, centred, centred)
        return (self.weights[:, None, None] * self.covs).sum(0) + between

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n i.i.d. data points (N x D)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[comp] + torch.einsum("nij,nj->ni", chol[comp], z)

    def posterior_mean(self, x_t: Tensor, alpha: float, sigma: float) -> Tensor:
        """E[x0 | x_t] for x_t = alpha x0 + sigma eps (exact; alpha = 0 gives the data mean)."""
        x = x_t.to(torch.float64)
        a, s2 = float(alpha), float(sigma) ** 2
        eye = torch.eye(self.dim, dtype=torch.float64)
        cov_t = a * a * self.covs + s2 * eye  # K x D x D, covariance of x_t given the component
        prec = torch.linalg.inv(cov_t)
        gain = a * self.covs @ prec  # K x D x D: E[x0 | x_t, k] = mu_k + gain_k (x_t - a mu_k)
        diff = x[None, :, :] - a * self.means[:, None, :]  # K x N x D
        cond_means: Tensor = self.means[:, None, :] + diff @ gain.mT  # K x N x D
        if len(self.weights) == 1:
            return cond_means[0].to(x_t.dtype)
        maha = ((diff @ prec) * diff).sum(-1)  # K x N (prec is symmetric)
        logp = self.weights.log()[:, None] - 0.5 * maha - 0.5 * torch.linalg.slogdet(cov_t).logabsdet[:, None]
        w = torch.softmax(logp, dim=0)
        return (w[..., None] * cond_means).sum(0).to(x_t.dtype)


def exact_model_fn(data: GaussianMixture, process: NoiseProcess) -> Callable[[Tensor, float], tuple[Tensor, Tensor]]:
    """``model_fn(x_t, t) -> (x0, eps)`` from the exact posterior mean (the optimal denoiser) on ``process``."""

    def model_fn(x_t: Tensor, t: float) -> tuple[Tensor, Tensor]:
        a, s = (float(v) for v in process.coefficients(torch.tensor(float(t), dtype=torch.float64)))
        x0 = data.posterior_mean(x_t, a, s)
        return x0, eps_from_x0(x_t, x0, a, s)

    return model_fn


def exact_net(
    data: GaussianMixture, process: NoiseProcess, prediction: str, sigma_data: float = 0.5
) -> Callable[[Tensor, Tensor, dict[str, Any]], Tensor]:
    """A 'network' ``net(x_in, net_time, cond)`` that outputs the exact ``prediction`` target (any of
    ``objectives.PREDICTIONS``), for ``guided_model_fn``, so the process's time input, the input scaling and the
    conversions are exercised too."""

    def net(x_in: Tensor, t_net: Tensor, cond: dict[str, Any]) -> Tensor:
        t = torch.as_tensor(process.time_from_net_time(t_net[:1].double()), dtype=torch.float64)
        a, s = process.coefficients(t)
        x_t = x_in.to(torch.float64) / input_scale(a, s, prediction, sigma_data)
        x0 = data.posterior_mean(x_t, float(a), float(s))
        eps = eps_from_x0(x_t, x0, a, s)
        da, ds = process.derivatives(t) if prediction == "flow" else (None, None)
        return training_target(x0, eps, a, s, prediction, da, ds, sigma_data).to(x_in.dtype)

    return net


def affine_moments(sampler_fn: Callable[[Tensor], Tensor], dim: int) -> tuple[Tensor, Tensor]:
    """Exact output mean and covariance of a sampler that is affine in its input noise (x_out = A x_T + b).

    With Gaussian data the optimal denoiser is affine in x_t, so every deterministic sampler is an affine map of
    x_T ~ N(0, I): run it on 0 and the D unit vectors, read off b and A, return (b, A A^T). No Monte Carlo error.
    """
    probe = torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.eye(dim, dtype=torch.float64)])
    out = sampler_fn(probe).to(torch.float64)
    b = out[0]
    a = (out[1:] - b).T
    return b, a @ a.T


def moment_errors(mean: Tensor, cov: Tensor, data: GaussianMixture) -> tuple[float, float]:
    """(||mean - mu||_2, ||cov - Sigma||_F / ||Sigma||_F) against the data's true moments."""
    return (float((mean - data.mean).norm()), float((cov - data.cov).norm() / data.cov.norm()))


def sample_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Empirical mean and (N - 1)-normalised covariance of N x D samples."""
    x = x.to(torch.float64)
    m = x.mean(0)
    c = x - m
    return m, c.T @ c / (x.shape[0] - 1)
