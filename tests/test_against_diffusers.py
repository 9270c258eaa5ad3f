"""difflab's diffusion core against diffusers (an independent reference, test-only dependency).

Schedules, targets, timestep grids, and full sampling loops (DDPM, DDIM, DPM-Solver++ 2M, Euler, Heun) driven by the
same deterministic fake model function and the same noise. Relative error = max |ours - theirs| / max |theirs|.

Precision notes: diffusers keeps its schedule in float32 (difflab in float64), so schedule-level comparisons carry
float32 round-off; the sampling-loop tests therefore give difflab the very alpha-bars diffusers uses
(``VPProcess.from_alphas_cumprod``) to compare the algorithms on the same inputs, and separate tests compare
the native float64 schedules end to end. With ``rescale_betas_zero_snr=True``, diffusers' DPM-Solver and Euler
replace the terminal alpha-bar 0 by 2**-24; difflab keeps 0 and takes the exact limit (tested separately: the two
differ by ~1e-4 relative).
"""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as hf_rescale  # noqa: E402

from difflab.diffusion.guidance import guided_model_fn, rescale_guidance  # noqa: E402
from difflab.diffusion.objectives import add_noise, clip_x0, training_target  # noqa: E402
from difflab.diffusion.processes import VPProcess  # noqa: E402
from difflab.diffusion.samplers import ddim, ddpm, dpmpp_2m, euler, heun  # noqa: E402

T = 1000
HF_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}
HF_PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
KIND_KW = {"scaled_linear": dict(beta_start=0.00085, beta_end=0.012)}
TOL = 1e-5


def fake(x: torch.Tensor, t) -> torch.Tensor:
    """Deterministic fake model: a fixed linear map of x_t whose coefficients depend on t."""
    s = float(t) / T
    return (0.6 + 0.3 * math.cos(math.pi * s)) * x + 0.2 * torch.flip(x, dims=[-1]) + 0.05 * s


def net(x, t, cond):
    return fake(x, t[0])


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    theirs = theirs.to(torch.float64)
    return ((ours.to(torch.float64) - theirs).abs().max() / theirs.abs().max()).item()


def x_T(dtype=torch.float64):
    return torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=dtype)


# ------------------------------------------------------------------ schedules, targets, grids


@pytest.mark.parametrize("kind", sorted(HF_KIND))
@pytest.mark.parametrize("n", [100, 500, 1000])
@pytest.mark.parametrize("zero", [False, True])
def test_alphas_cumprod(kind, n, zero):
    ours = VPProcess(kind, n, zero_terminal_snr=zero, **KIND_KW.get(kind, {}))
    hf = DDPMScheduler(
        num_train_timesteps=n, beta_schedule=HF_KIND[kind], rescale_betas_zero_snr=zero, **KIND_KW.get(kind, {})
    )
    theirs = hf.alphas_cumprod.double()
    # relative 1e-5, with an absolute 1e-8 for the tiny alpha-bars where diffusers' float32 round-off dominates (the
    # cosine cap 0.999 is 0.99900001 in float32; zero-SNR rescaling subtracts nearly equal float32 numbers)
    torch.testing.assert_close(ours.alphas_cumprod, theirs, rtol=TOL, atol=1e-8)
    if not zero:
        big = theirs > 1e-3
        assert ((ours.alphas_cumprod - theirs).abs() / theirs)[big].max().item() < TOL
    else:
        # ... and diffusers' own rescaling function run in float64 on our betas agrees to round-off
        plain = VPProcess(kind, n, **KIND_KW.get(kind, {}))
        ref = torch.cumprod(1 - hf_rescale(plain.betas.clone()), 0)
        torch.testing.assert_close(ours.alphas_cumprod, ref, rtol=1e-12, atol=1e-15)
        assert ours.alphas_cumprod[-1] == 0 and theirs[-1] == 0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_noising_and_v_target(kind):
    ours = VPProcess(kind, T)
    hf = DDPMScheduler(num_train_timesteps=T, beta_schedule=HF_KIND[kind])
    g = torch.Generator().manual_seed(1)
    x0, eps = (
        torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([0, 1, 10, 250, 500, 750, 998, 999])
    a, s = ours.coefficients_like(t, x0)
    assert rel_err(add_noise(x0, eps, a, s), hf.add_noise(x0, eps, t)) < TOL
    assert rel_err(training_target(x0, eps, a, s, "v"), hf.get_velocity(x0, eps, t)) < TOL
    assert torch.equal(training_target(x0, eps, a, s, "eps"), eps)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [7, 10, 20, 25, 50])
def test_timestep_grids(spacing, steps):
    sch = VPProcess("cosine", T)
    for cls in (DDPMScheduler, DDIMScheduler):
        hf = cls(num_train_timesteps=T, timestep_spacing=spacing)
        hf.set_timesteps(steps)
        assert sch.sampling_timesteps(steps, spacing).tolist() == hf.timesteps.tolist(), cls.__name__
    hf = DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    hf.set_timesteps(steps)
    assert sch.sampling_timesteps(steps, spacing, exclude_zero=True).tolist() == hf.timesteps.tolist()


def test_dynamic_thresholding():
    hf = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)
    x = 4 * torch.randn(5, 2, 6, 6, generator=torch.Generator().manual_seed(2))
    x[0] *= 0.1  # an in-range sample (s clamps to 1)
    ours = clip_x0(x, "dynamic", dynamic_quantile=0.9, dynamic_max=3.0)
    assert rel_err(ours, hf._threshold_sample(x.clone())) < 1e-6


def test_guidance_rescale():
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    guided = uncond + 7.5 * (cond - uncond)
    assert rel_err(rescale_guidance(guided, cond, 0.7), rescale_noise_cfg(guided, cond, guidance_rescale=0.7)) < 1e-6


# ------------------------------------------------------------------ full sampling loops

CASES = [
    (kind, zero, spacing, pred)
    for kind in ("linear", "cosine")
    for zero in (False, True)
    for spacing in ("leading", "trailing")
    for pred in ("eps", "v", "x0")
    if not (zero and pred == "eps")
]


def _ids(case):
    kind, zero, spacing, pred = case
    return f"{kind}{'-zsnr' if zero else ''}-{spacing}-{pred}"


def _hf(cls, kind, zero, spacing, pred, **kw):
    if zero:
        kw["rescale_betas_zero_snr"] = True
    return cls(
        num_train_timesteps=T,
        beta_schedule=HF_KIND[kind],
        prediction_type=HF_PRED[pred],
        timestep_spacing=spacing,
        **kw,
    )


def _same(hf, spacing) -> VPProcess:
    """difflab schedule holding exactly the alpha-bars the diffusers scheduler uses."""
    return VPProcess.from_alphas_cumprod(hf.alphas_cumprod, spacing=spacing)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_loop(case, eta):
    kind, zero, spacing, pred = case
    hf = _hf(DDIMScheduler, kind, zero, spacing, pred, clip_sample=False)
    hf.set_timesteps(10)
    x, g = x_T(), torch.Generator().manual_seed(7)
    for t in hf.timesteps:
        x = hf.step(fake(x, t), t, x, eta=eta, generator=g).prev_sample
    sch = _same(hf, spacing)
    ours = ddim(
        guided_model_fn(net, sch, pred, {}, None),
        x_T(),
        sch,
        steps=10,
        eta=eta,
        generator=torch.Generator().manual_seed(7),
    )
    assert rel_err(ours, x) < TOL


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_ddpm_loop(case):
    kind, zero, spacing, pred = case
    hf = _hf(DDPMScheduler, kind, zero, spacing, pred, clip_sample=False)
    hf.set_timesteps(10)
    x, g = x_T(), torch.Generator().manual_seed(5)
    for t in hf.timesteps:
        x = hf.step(fake(x, t), t, x, generator=g).prev_sample  # one noise draw per step with t > 0, replayed below
    sch = _same(hf, spacing)
    ours = ddpm(
        guided_model_fn(net, sch, pred, {}, None), x_T(), sch, steps=10, generator=torch.Generator().manual_seed(5)
    )
    assert rel_err(ours, x) < TOL


def test_ddpm_all_1000_steps_zero_snr_v():
    """All 1000 steps. diffusers' step arithmetic runs in its schedule's dtype (float32: 1 - alpha_t / alpha_t-1
    loses ~1e-3 relative on the smallest betas, ~3e-4 on the result after 1000 steps), so its schedule tensors are
    upcast to float64 here to compare the algorithm itself."""
    hf = _hf(DDPMScheduler, "cosine", True, "leading", "v", clip_sample=False)
    hf.alphas_cumprod, hf.one = hf.alphas_cumprod.double(), hf.one.double()
    x, g = x_T(), torch.Generator().manual_seed(9)
    for t in hf.timesteps:  # no set_timesteps: every training step, prev = t - 1
        x = hf.step(fake(x, t), t, x, generator=g).prev_sample
    sch = _same(hf, "leading")
    ours = ddpm(guided_model_fn(net, sch, "v", {}, None), x_T(), sch, generator=torch.Generator().manual_seed(9))
    assert rel_err(ours, x) < TOL


def _hf_dpm(kind, zero, spacing, pred, steps, order=2):
    hf = _hf(
        DPMSolverMultistepScheduler,
        kind,
        zero,
        spacing,
        pred,
        algorithm_type="dpmsolver++",
        solver_order=order,
        solver_type="midpoint",
    )
    hf.set_timesteps(steps)
    x = x_T()
    for t in hf.timesteps:
        x = hf.step(fake(x, t), t, x).prev_sample
    return hf, x


@pytest.mark.parametrize("case", CASES + [(k, z, "linspace", p) for k, z, _, p in CASES[:5]], ids=_ids)
@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_loop(case, steps):
    kind, zero, spacing, pred = case
    hf, x = _hf_dpm(kind, zero, spacing, pred, steps)
    sch = _same(hf, spacing)  # with zero SNR this carries diffusers' terminal alpha-bar 2**-24
    ours = dpmpp_2m(guided_model_fn(net, sch, pred, {}, None), x_T(), sch, steps=steps)
    assert rel_err(ours, x) < TOL


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_native_float64_schedules_end_to_end(spacing):
    """difflab's own schedules (no alpha-bars shared) against diffusers: DDIM, DDPM and DPM-Solver++ loops."""
    for kind, pred in (("cosine", "v"), ("linear", "eps")):
        sch = VPProcess(kind, T, spacing=spacing)
        mf = guided_model_fn(net, sch, pred, {}, None)
        hf = _hf(DDIMScheduler, kind, False, spacing, pred, clip_sample=False)
        hf.set_timesteps(25)
        x = x_T()
        for t in hf.timesteps:
            x = hf.step(fake(x, t), t, x).prev_sample
        assert rel_err(ddim(mf, x_T(), sch, steps=25), x) < TOL
        _, x = _hf_dpm(kind, False, spacing, pred, 20)
        assert rel_err(dpmpp_2m(mf, x_T(), sch, steps=20), x) < TOL
    sch = VPProcess("cosine", T, zero_terminal_snr=True, spacing="trailing")
    hf = _hf(DDPMScheduler, "cosine", True, "trailing", "v", clip_sample=False)
    hf.set_timesteps(20)
    x, g = x_T(), torch.Generator().manual_seed(4)
    for t in hf.timesteps:
        x = hf.step(fake(x, t), t, x, generator=g).prev_sample
    ours = ddpm(
        guided_model_fn(net, sch, "v", {}, None), x_T(), sch, steps=20, generator=torch.Generator().manual_seed(4)
    )
    assert rel_err(ours, x) < TOL


def test_dpmpp_exact_zero_snr_limit_vs_diffusers_floor():
    """difflab keeps alpha_bar(T-1) = 0 (exact limit); diffusers uses 2**-24: close, and both finite."""
    hf, x = _hf_dpm("cosine", True, "trailing", "v", 20)
    sch = VPProcess("cosine", T, zero_terminal_snr=True, spacing="trailing")
    ours = dpmpp_2m(guided_model_fn(net, sch, "v", {}, None), x_T(), sch, steps=20)
    assert torch.isfinite(ours).all() and rel_err(ours, x) < 2e-3


def test_ddim_on_linspace_grid_matches_first_order_dpm_solver():
    """diffusers' DDIM steps to t - T // steps, which is not the next linspace timestep; difflab steps to the next
    grid point. DPM-Solver++ order 1 is DDIM and accepts the exact grid: compare with that."""
    hf = _hf(
        DPMSolverMultistepScheduler, "cosine", False, "linspace", "v", algorithm_type="dpmsolver++", solver_order=1
    )
    sch = _same(hf, "linspace")
    hf.set_timesteps(timesteps=sch.sampling_timesteps(10).tolist())
    x = x_T()
    for t in hf.timesteps:
        x = hf.step(fake(x, t), t, x).prev_sample
    ours = ddim(guided_model_fn(net, sch, "v", {}, None), x_T(), sch, steps=10)
    assert rel_err(ours, x) < TOL


def _hf_sigma_loop(cls, kind, spacing, pred, steps):
    hf = _hf(cls, kind, False, spacing, pred)
    hf.set_timesteps(steps)
    x = x_T() * float((hf.sigmas[0] ** 2 + 1) ** 0.5)  # z_T = x_T / sqrt(alpha_bar) in diffusers' VE space
    for t in hf.timesteps:
        x = hf.step(fake(hf.scale_model_input(x, t), t), t, x).prev_sample
    return hf, x


@pytest.mark.parametrize(
    "kind,spacing,pred", [("linear", "leading", "eps"), ("cosine", "leading", "v"), ("linear", "trailing", "x0")]
)
def test_euler_and_heun_loops(kind, spacing, pred):
    """diffusers' Euler / Heun step in float32 in the variance-exploding space z = x / sqrt(alpha_bar); with the
    cosine schedule's sigma_max ~ 2e4 (trailing) that alone costs ~1e-4 relative, so those cases use sigma_max
    < 200 (linear, or leading spacing) where float32 suffices for the 1e-5 comparison."""
    hf, x = _hf_sigma_loop(EulerDiscreteScheduler, kind, spacing, pred, 15)
    sch = _same(hf, spacing)
    assert rel_err(euler(guided_model_fn(net, sch, pred, {}, None), x_T(), sch, steps=15), x) < TOL
    hf, x = _hf_sigma_loop(HeunDiscreteScheduler, kind, spacing, pred, 8)
    sch = _same(hf, spacing)
    ours = heun(guided_model_fn(net, sch, pred, {}, None), x_T(), sch, steps=8, euler_above=None)  # pure EDM Heun
    assert rel_err(ours, x) < TOL
