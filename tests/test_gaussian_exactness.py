"""Samplers driven by the exact denoiser of data with known moments (Gaussian, mixture of Gaussians) reproduce the
data mean and covariance, and their error shrinks as steps increase (at the order each method should have)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from difflab.diffusion.gaussian import (
    GaussianMixture,
    affine_moments,
    exact_model_fn,
    exact_net,
    moment_errors,
    sample_moments,
)
from difflab.diffusion.guidance import guided_model_fn
from difflab.diffusion.processes import VPProcess
from difflab.diffusion.samplers import SAMPLERS

COV = torch.tensor([[0.30, 0.12, 0.0], [0.12, 0.10, 0.02], [0.0, 0.02, 0.01]], dtype=torch.float64)
GAUSS = GaussianMixture.gaussian([0.5, -0.3, 0.2], COV)
MIX = GaussianMixture(
    [0.5, 0.3, 0.2],
    [[-0.6, -0.4], [0.5, -0.3], [0.0, 0.6]],
    [[[0.02, 0.0], [0.0, 0.01]], [[0.015, 0.005], [0.005, 0.02]], [[0.01, 0.0], [0.0, 0.03]]],
)
DETERMINISTIC = ["ddim", "euler", "dpmpp_2m", "heun"]
SECOND_ORDER = {"dpmpp_2m", "heun"}


def _mf(data, sch, prediction="v"):
    return guided_model_fn(exact_net(data, sch, prediction), sch, prediction, {}, None)


def _exact(name, data, sch, steps, spacing=None, prediction="v"):
    mf = _mf(data, sch, prediction)
    fn = functools.partial(SAMPLERS[name], steps=steps, spacing=spacing)
    return moment_errors(*affine_moments(lambda x: fn(mf, x, sch), data.dim), data)


def test_posterior_mean_matches_quadrature_1d_mixture():
    mix = GaussianMixture([0.3, 0.7], [[-1.0], [0.8]], [[[0.05]], [[0.2]]])
    grid = torch.linspace(-5, 5, 40001, dtype=torch.float64)
    prior = sum(
        w * torch.exp(-0.5 * (grid - m[0]) ** 2 / c[0, 0]) / math.sqrt(2 * math.pi * c[0, 0])
        for w, m, c in zip(mix.weights, mix.means, mix.covs)
    )
    x_t = torch.tensor([[-2.0], [-0.3], [0.0], [0.9], [2.5]], dtype=torch.float64)
    for ab in (0.95, 0.5, 0.1, 0.0):
        a, s2 = math.sqrt(ab), 1 - ab
        lik = torch.exp(-0.5 * (x_t - a * grid[None]) ** 2 / s2)
        num, den = (lik * prior * grid).sum(1), (lik * prior).sum(1)
        assert torch.allclose(mix.posterior_mean(x_t, ab**0.5, (1 - ab) ** 0.5)[:, 0], num / den, atol=1e-6), ab
    assert torch.allclose(mix.posterior_mean(x_t, 0.0, 1.0), mix.mean.expand(5, 1))


def test_mixture_moments_and_sampling():
    x = MIX.sample(200000, torch.Generator().manual_seed(0))
    m, c = sample_moments(x)
    assert torch.allclose(m, MIX.mean, atol=0.005) and torch.allclose(c, MIX.cov, atol=0.005)


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("zero", [False, True])
def test_deterministic_samplers_converge_to_the_data_moments(name, zero):
    sch = VPProcess("cosine", 1000, zero_terminal_snr=zero, spacing="trailing")
    errs = [_exact(name, GAUSS, sch, steps) for steps in (5, 10, 20, 40, 100)]
    cov = [e[1] for e in errs]
    assert all(b < a for a, b in zip(cov, cov[1:])), f"{name}: covariance error must shrink with steps: {cov}"
    assert cov[-1] < (0.005 if name in SECOND_ORDER else 0.035)
    # mean: exact up to round-off with zero terminal SNR; else x_T at t = 999 misses sqrt(ab) mu ~ 3e-5
    assert max(e[0] for e in errs) < (1e-12 if zero else 1e-4)
    # order: 10 -> 20 steps (at many steps the last jump to sigma 0, x0_hat(x_t_min), dominates every sampler)
    ratio = cov[1] / cov[2]
    if name in SECOND_ORDER:
        assert ratio > 2.5, f"{name} should converge faster than first order, 10->20 steps ratio {ratio:.2f}"
    else:
        assert 1.5 < ratio < 2.3, f"{name} should converge at first order, 10->20 steps ratio {ratio:.2f}"


def test_every_prediction_type_gives_the_same_sampler():
    sch = VPProcess("cosine", 1000, spacing="trailing")
    ref = _exact("dpmpp_2m", GAUSS, sch, 10, prediction="v")
    for p in ("eps", "x0"):
        assert _exact("dpmpp_2m", GAUSS, sch, 10, prediction=p) == pytest.approx(ref, rel=1e-6, abs=1e-9)
    direct = exact_model_fn(GAUSS, sch)  # bypassing the conversions entirely
    m, c = affine_moments(lambda x: SAMPLERS["dpmpp_2m"](direct, x, sch, steps=10), 3)
    assert moment_errors(m, c, GAUSS) == pytest.approx(ref, rel=1e-6, abs=1e-9)


def test_leading_spacing_has_a_mean_error_floor_trailing_does_not():
    """'leading' starts below T - 1, where x_T ~ N(0, I) is not the marginal: more steps do not fix the mean."""
    sch = VPProcess("cosine", 1000)
    lead = [_exact("ddim", GAUSS, sch, s, "leading")[0] for s in (10, 50)]
    trail = [_exact("ddim", GAUSS, sch, s, "trailing")[0] for s in (10, 50)]
    assert lead[0] > 0.02 and lead[1] > 0.005 and max(trail) < 1e-4


def _mc(name, data, sch, steps, n=10000, **kw):
    x_T = torch.randn(n, data.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = SAMPLERS[name](_mf(data, sch), x_T, sch, steps=steps, generator=torch.Generator().manual_seed(1), **kw)
    return x, moment_errors(*sample_moments(x), data)


def test_ddpm_monte_carlo_converges():
    sch = VPProcess("cosine", 1000, spacing="trailing")
    _, (m20, c20) = _mc("ddpm", GAUSS, sch, 20)
    _, (m100, c100) = _mc("ddpm", GAUSS, sch, 100)
    se_mean = math.sqrt(GAUSS.cov.trace().item() / 10000)
    assert m100 < 4 * se_mean and c100 < 0.1 and c100 < c20 / 2, (m20, c20, m100, c100)


@pytest.mark.parametrize("name,steps", [("dpmpp_2m", 20), ("heun", 20), ("ddim", 50), ("ddpm", 100)])
def test_mixture_of_gaussians(name, steps):
    sch = VPProcess("cosine", 1000, zero_terminal_snr=True, spacing="trailing")
    x, (me, ce) = _mc(name, MIX, sch, steps, n=4000)
    assert me < 0.03 and ce < 0.06, (name, me, ce)  # Monte Carlo SE of the mean ~0.008 at N = 4000
    nearest = torch.cdist(x, MIX.means).argmin(1)  # modes are well separated: the mixture weights come back
    fractions = torch.bincount(nearest, minlength=3).double() / len(x)
    assert torch.allclose(fractions, MIX.weights, atol=0.02), fractions.tolist()
