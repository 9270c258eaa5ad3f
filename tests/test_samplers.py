"""Samplers: every sampler with every target, schedule and spacing (incl. zero terminal SNR, no NaN), on every process,
identities between samplers, model-evaluation counts, reproducibility, undefined combinations and the sampler
configs."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from difflab.configs import CONFIG_DIR
from difflab.diffusion.guidance import guided_model_fn
from difflab.diffusion.objectives import Objective, X0Clip
from difflab.diffusion.processes import EDMProcess, FlowProcess, VPProcess
from difflab.diffusion.samplers import (
    SAMPLERS,
    check_sampler,
    ddim,
    ddpm,
    dpmpp_2m,
    euler,
    heun,
    model_evaluations,
    sampler_name,
    times_used,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = {
    "cosine": dict(kind="cosine"),
    "linear": dict(kind="linear"),
    "scaled_linear_zsnr": dict(kind="scaled_linear", zero_terminal_snr=True),
    "cosine_zsnr": dict(kind="cosine", zero_terminal_snr=True),
}


def fake_net(x_t, t, cond):
    """A deterministic stand-in for a trained network (a fixed, t-dependent linear map)."""
    s = t.view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype) / 100
    return (0.5 + 0.3 * torch.cos(math.pi * s)) * x_t + 0.1 * torch.roll(x_t, 1, dims=-1) + 0.05 * s


def _noise(shape=(2, 1, 4, 4), dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_every_sampler_target_schedule_and_spacing(sampler, prediction, schedule, spacing):
    sch = VPProcess(num_timesteps=100, **SCHEDULES[schedule])
    clip = "none" if prediction == "eps" and "zsnr" in schedule else "static"
    mf = guided_model_fn(fake_net, sch, prediction, {}, None, x0_clip=X0Clip(clip))
    steps = 10 if sampler != "ddpm" else 20
    x = SAMPLERS[sampler](mf, _noise(), sch, steps=steps, spacing=spacing, generator=torch.Generator().manual_seed(1))
    assert x.shape == (2, 1, 4, 4) and x.dtype == torch.float32
    assert torch.isfinite(x).all(), f"{sampler} {prediction} {schedule} {spacing}"


def _consistent_fn(sch, prediction="v"):
    return guided_model_fn(fake_net, sch, prediction, {}, None)


@pytest.mark.parametrize("zero", [False, True])
def test_euler_equals_ddim_eta0(zero):
    """Euler in sigma space with d = (z - x0) / sigma is DDIM with eps taken from x0 (Karras et al., Sec. 4)."""
    sch = VPProcess("cosine", 100, zero_terminal_snr=zero, spacing="trailing")
    x = _noise(dtype=torch.float64)
    a = euler(_consistent_fn(sch), x, sch, steps=12)
    b = ddim(_consistent_fn(sch), x, sch, steps=12)
    assert torch.allclose(a, b, atol=1e-12)


def test_ddim_eta1_equals_ddpm_ancestral():
    sch = VPProcess("linear", 100)
    x = _noise(dtype=torch.float64)
    a = ddim(_consistent_fn(sch, "eps"), x, sch, steps=10, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = ddpm(_consistent_fn(sch, "eps"), x, sch, steps=10, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=1e-10)


def test_first_order_steps_agree_and_second_order_differs():
    """Two-step runs: DPM++(2M)'s steps are both first order (first and last) = DDIM on the same grid; with more
    steps the multistep correction changes the result."""
    sch = VPProcess("cosine", 100, spacing="trailing")
    x = _noise(dtype=torch.float64)
    grid = times_used(dpmpp_2m, sch, 2)
    assert grid == [99, 49]
    a = dpmpp_2m(_consistent_fn(sch), x, sch, steps=2)
    b = ddim(_consistent_fn(sch), x, sch, steps=2)  # trailing DDIM grid is [99, 49] too
    assert torch.allclose(a, b, atol=1e-12)
    c = dpmpp_2m(_consistent_fn(sch), x, sch, steps=5)
    d = ddim(_consistent_fn(sch), x, sch, steps=5)
    assert not torch.allclose(c, d, atol=1e-4)


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t):
        self.calls.append(float(t))
        return self.fn(x, t)


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize(
    "name,steps", [("ddpm", None), ("ddpm", 7), ("ddim", 9), ("dpmpp_2m", 9), ("euler", 6), ("heun", 6)]
)
def test_model_evaluation_counts(name, steps, zero):
    sch = VPProcess("cosine", 50, zero_terminal_snr=zero, spacing="trailing")
    fn = Counter(_consistent_fn(sch))
    SAMPLERS[name](fn, _noise(), sch, steps=steps, generator=torch.Generator().manual_seed(0))
    assert len(fn.calls) == model_evaluations(SAMPLERS[name], sch, steps)
    # Heun: the first step (sigma = inf, or sigma ~ 2e3 > euler_above = 80 for cosine's last step) is Euler
    expected = {"ddpm": steps or 50, "heun": 2 * (steps or 0) - 2}.get(name, steps)
    assert len(fn.calls) == expected
    assert fn.calls == sorted(fn.calls, reverse=True) or name == "heun"


def test_heun_euler_above():
    sch = VPProcess("linear", 100, spacing="trailing")
    sig = [float(sch.sigmas[t]) for t in sch.sampling_timesteps(5)]  # 1.32, 0.95, 0.66, ...
    assert model_evaluations(functools.partial(heun, steps=5), sch) == 9
    below_first = (sig[0] + sig[1]) / 2  # only the first step is Euler
    assert model_evaluations(functools.partial(heun, steps=5, euler_above=below_first), sch) == 8
    fn = Counter(_consistent_fn(sch))
    heun(fn, _noise(), sch, steps=5, euler_above=below_first)
    assert len(fn.calls) == 8


def test_ddpm_is_reproducible_and_uses_the_generator():
    sch = VPProcess("cosine", 50)
    mf = _consistent_fn(sch)
    a = ddpm(mf, _noise(), sch, generator=torch.Generator().manual_seed(0))
    b = ddpm(mf, _noise(), sch, generator=torch.Generator().manual_seed(0))
    c = ddpm(mf, _noise(), sch, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    large = ddpm(mf, _noise(), sch, variance="large", generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, large)
    with pytest.raises(ValueError, match="variance"):
        ddpm(mf, _noise(), sch, variance="learned")


class TinyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_zero_terminal_snr_and_min_snr_never_nan(prediction):
    """Training loss (incl. gradients) and every sampler, eps and v targets, zero terminal SNR + min-SNR."""
    sch = VPProcess("cosine", 100, zero_terminal_snr=True, spacing="trailing")
    obj = Objective(prediction=prediction, weighting="min_snr", min_snr_gamma=5.0, x0_clip="static")
    net = TinyDenoiser()
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = obj.losses(net, x0, sch, t=torch.tensor([99, 99, 98, 60, 1, 0]))
    out["loss"].mean().backward()
    assert torch.isfinite(out["loss"]).all() and all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert out["loss"][0] > 0 if prediction == "eps" else out["loss"][0] == 0  # min-SNR weight 1 (eps) / 0 (v)
    mf = guided_model_fn(lambda x, t, c: net(x, t), sch, prediction, {}, None, x0_clip=obj.x0_clip)
    with torch.no_grad():
        for name, fn in SAMPLERS.items():
            for steps in (5, 20):
                x = fn(mf, _noise((2, 1, 8, 8)), sch, steps=steps, generator=torch.Generator().manual_seed(0))
                assert torch.isfinite(x).all(), (name, steps)


def test_sampler_name():
    assert sampler_name(functools.partial(ddim, steps=25)) == "ddim-25"
    assert sampler_name(functools.partial(ddpm, steps=None)) == "ddpm"
    assert sampler_name(heun) == "heun"


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m", "euler", "heun"])
def test_sampler_configs_compose_and_run(name):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"sampler={name}",
                "schedule.num_timesteps=40",
                "schedule.zero_terminal_snr=true",
                "schedule.spacing=trailing",
                *([] if name == "ddpm" else ["sampler.steps=4"]),
            ],
        )
    sampler = instantiate(cfg.sampler)
    sch = instantiate(cfg.schedule)
    assert isinstance(sampler, functools.partial) and sampler.func is SAMPLERS[name]
    x = sampler(_consistent_fn(sch), _noise(), sch, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.isfinite(x).all()
    assert sampler_name(sampler) == (name if name == "ddpm" else f"{name}-4")


@pytest.mark.parametrize("process", [EDMProcess(), FlowProcess(), FlowProcess(shift=3.0)], ids=["edm", "flow", "flow3"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm", "flow"])
def test_every_sampler_runs_on_the_continuous_processes(process, sampler, prediction):
    mf = guided_model_fn(lambda x, t, c: 0.3 * x, process, prediction, {}, None, x0_clip="static")
    x = SAMPLERS[sampler](
        mf, _noise() * process.prior_std, process, steps=6, generator=torch.Generator().manual_seed(1)
    )
    assert x.shape == (2, 1, 4, 4) and torch.isfinite(x).all() and x.abs().max() <= 1 + 1e-6  # ends on a clipped x0


def test_euler_equals_ddim_eta0_on_every_process():
    for process in (EDMProcess(), FlowProcess(shift=2.0)):
        x = _noise(dtype=torch.float64) * process.prior_std
        mf = guided_model_fn(fake_net, process, "x0", {}, None)
        assert torch.allclose(euler(mf, x, process, steps=7), ddim(mf, x, process, steps=7), atol=1e-10)


def test_flow_euler_is_the_velocity_step():
    """On the linear path, x' = x + (t' - t) v with v the predicted velocity (the rectified-flow sampler)."""
    process = FlowProcess(shift=3.0)
    v_net = lambda x, t, c: 0.7 * x - 0.2  # noqa: E731  (a fixed velocity field)
    x = _noise(dtype=torch.float64)
    ts = process.sampling_times(5).tolist()
    ref = x.clone()
    for t, t_next in zip(ts, ts[1:]):
        ref = ref + (t_next - t) * v_net(ref, None, None)
    got = euler(guided_model_fn(v_net, process, "flow", {}, None), x, process, steps=5)
    assert torch.allclose(got, ref, atol=1e-12)


def test_heun_counts_on_edm_and_flow():
    for process in (EDMProcess(), FlowProcess()):
        fn = Counter(guided_model_fn(fake_net, process, "x0", {}, None))
        heun(fn, _noise() * process.prior_std, process, steps=6)
        assert len(fn.calls) == model_evaluations(functools.partial(heun, steps=6), process) == 2 * 6 - 1


def test_undefined_combinations_fail_with_what_is_allowed():
    with pytest.raises(ValueError, match="sampler=ddpm needs a discrete process.*ddim .*euler, heun or dpmpp_2m"):
        check_sampler(functools.partial(ddpm), EDMProcess())
    with pytest.raises(ValueError, match="s_churn > 0 needs a continuous process"):
        check_sampler(functools.partial(heun, s_churn=10.0), VPProcess("cosine", 50))
    check_sampler(functools.partial(heun, s_churn=10.0), EDMProcess())  # defined there
    with pytest.raises(ValueError, match="discrete process"):
        ddpm(_consistent_fn(VPProcess("cosine", 50)), _noise(), FlowProcess())


def test_churn_adds_noise_only_inside_its_sigma_range():
    process = EDMProcess()
    mf = guided_model_fn(fake_net, process, "x0", {}, None)
    x = _noise(dtype=torch.float64) * process.prior_std
    plain = heun(mf, x, process, steps=8)
    outside = heun(
        mf, x, process, steps=8, s_churn=40.0, s_tmin=1e3, s_tmax=1e4, generator=torch.Generator().manual_seed(0)
    )
    inside = heun(
        mf, x, process, steps=8, s_churn=40.0, s_tmin=0.05, s_tmax=50, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(plain, outside) and not torch.allclose(plain, inside)
