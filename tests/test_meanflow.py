"""MeanFlow (method=meanflow, src/methods/meanflow.py, src/diffusion/meanflow.py, sampler=meanflow): the loss against
the authors' PyTorch code re-typed in their own time convention, the (t, r) sampler, the interval input of UNet2D and
DiT, the one- and two-step sampler on a network that records its inputs, a real run sampled as an ordinary
checkpoint, and one-line refusals."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from difflab.conditioning.base import ClassConditioner
from difflab.config_checks import check_config
from difflab.diffusion.guidance import APG, CFG, guidance_active, guidance_active_per_sample
from difflab.diffusion.meanflow import adaptive_l2, guided_velocity, meanflow_target, meanflow_times
from difflab.diffusion.objectives import Objective
from difflab.diffusion.processes import EDMProcess, FlowProcess
from difflab.diffusion.samplers import euler, meanflow
from difflab.diffusion.system import Diffusion
from difflab.lit_modules.diffusion_module import DiffusionModule
from difflab.methods.meanflow import MeanFlowTraining
from difflab.models.dit import DiT
from difflab.models.unet2d import UNet2D
from difflab.utils.errors import ConfigError
from tests.helpers import compose_train, run_hydra_main, tiny_overrides

torch.set_num_threads(1)


def _module(interval_input=True, sampler=None, seed=0):
    torch.manual_seed(seed)
    net = functools.partial(
        UNet2D, in_channels=1, base_channels=8, channel_mults=(1, 2), attention_levels=(1,), groups=4, head_dim=8,
        interval_input=interval_input,
    )  # fmt: skip
    diffusion = Diffusion(
        FlowProcess(t_min=0),
        Objective(prediction="flow", x0_clip="none"),
        sampler or functools.partial(meanflow, steps=1),
        guidance=CFG(scale=1.0),
        conditioner=ClassConditioner(3, embed_dim=4),
        sample_shape=(1, 4, 4),
        p_uncond=0.0,
    )
    module = DiffusionModule(net=net, diffusion=diffusion)
    with torch.no_grad():
        for p in module.denoiser.parameters():  # off the zero-initialised output layer: u and du/dt are not 0
            p.add_(torch.randn_like(p) * 0.1)
    return module


# ---------------------------------------------------------------- the loss, against the authors' code re-typed
def _their_loss(net_port, x, e, t_port, r_port, norm_p, norm_eps):
    """py-meanflow's MeanFlow.forward_with_loss, in its convention (t = 0 noise, t = 1 data): z = t x + (1 - t) e,
    v = x - e, net(z, (t, h = r - t)); jvp over (z, t, r) with tangents (v, 1, 0); u_tgt = v - (t - r) du/dt;
    squared error summed per sample over (error + eps)^p, stopped, averaged over the batch."""
    t, r = t_port.view(-1, 1, 1, 1), r_port.view(-1, 1, 1, 1)
    z = t * x + (1 - t) * e
    v = x - e

    def u_func(z, t, r):
        return net_port(z, t.view(-1), (r - t).view(-1))

    with sdpa_kernel(SDPBackend.MATH):  # attention's fused CPU kernel has no forward AD
        u_pred, dudt = torch.func.jvp(u_func, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    u_tgt = (v - (t - r) * dudt).detach()
    loss = ((u_pred - u_tgt) ** 2).sum(dim=(1, 2, 3))
    return (loss / (loss.detach() + norm_eps) ** norm_p).mean()


@pytest.mark.parametrize("p", [1.0, 0.75])
def test_the_loss_is_the_authors_meanflow_loss(p):
    """The same draws through our method (t = 1 noise, v = eps - x) and through their code (t = 0 noise, v = x - eps,
    the network's velocity negated): equal losses."""
    module = _module()
    d = module.diffusion
    method = MeanFlowTraining(ratio=0.5, adaptive_p=p)
    batch = {"x": torch.randn(6, 1, 4, 4), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    torch.manual_seed(3)
    ours = method.loss(module, batch)
    torch.manual_seed(3)
    cond = d.condition(d.conditioner.drop(batch["label"], 0.0))
    t, r = meanflow_times(6, 0.5, -0.4, 1.0)
    eps = torch.randn_like(batch["x"])
    assert (r < t).any() and (r == t).any()

    def net_port(z, t_port, h):  # their network: our average velocity over [1 - r, 1 - t] in our time, negated
        t_net = (1 - t_port) * 1000
        return -module(z, t_net.float(), cond["vector"], None, None, interval=(h * 1000).float())

    module.eval()  # no dropout in this network; eval keeps both passes identical
    theirs = _their_loss(net_port, batch["x"], eps, (1 - t).float(), (1 - r).float(), p, 1e-3)
    assert torch.allclose(ours, theirs, rtol=1e-4), (ours, theirs)


def _their_guided_loss(u_net, x, y, y_null, e, t, r, drop, omega, kappa, t_start, t_end, norm_p, norm_eps):
    """The authors' JAX MeanFlow.forward (Gsunshine/meanflow, meanflow.py) re-typed in torch, same time convention
    (z = (1 - t) x + t e, v = e - x): guidance_fn's kappa form with omega, kappa switched off outside [t_start, t_end],
    cond_drop's rows keeping v and the null class, jvp over (z, t, r) with tangents (v_g, 1, 0), u_tgt = v_g -
    clip(t - r, 0, 1) du/dt, adaptive weighting."""
    t4, r4 = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    z = (1 - t4) * x + t4 * e
    v = e - x
    with torch.no_grad():
        v_uncond = u_net(z, t, torch.zeros_like(t), y_null)
        v_cond = u_net(z, t, torch.zeros_like(t), y)
    inside = (t4 >= t_start) & (t4 <= t_end)
    w = torch.where(inside, omega, 1.0)
    k = torch.where(inside, kappa, 0.0)
    v_g = w * v + (1 - w - k) * v_uncond + k * v_cond
    drop4 = drop.view(-1, 1, 1, 1)
    y_inp = torch.where(drop, y_null, y)
    v_g = torch.where(drop4, v, v_g)

    def u_fn(z, t, r):
        return u_net(z, t, t - r, y_inp)

    with sdpa_kernel(SDPBackend.MATH):
        u, du_dt = torch.func.jvp(u_fn, (z, t, r), (v_g, torch.ones_like(t), torch.zeros_like(r)))
    u_tgt = (v_g - (t4 - r4).clamp(0, 1) * du_dt).detach()
    loss = ((u - u_tgt) ** 2).sum(dim=(1, 2, 3))
    return (loss / (loss.detach() + norm_eps) ** norm_p).mean()


@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_the_guided_loss_is_the_authors_guided_meanflow_loss(kappa):
    """CFG baked into the targets: our method with guidance=cfg (scale 2, an interval) against the authors' code with
    omega = scale (1 - kappa) and their interval in t, on draws that include dropped rows, rows outside the interval
    and rows with r != t."""
    module = _module()
    d = module.diffusion
    d.p_uncond = 0.4
    with torch.no_grad():
        d.conditioner.embedding.weight.mul_(50)  # classes far apart: u_c - u_u is not small
    scale, lo, hi = 2.0, 0.25, 3.0  # sigma / alpha; flow's t = sigma / (1 + sigma)
    method = MeanFlowTraining(
        ratio=0.5, adaptive_p=0.5, target_guidance=CFG(scale=scale, interval=[lo, hi]), kappa=kappa
    )
    n = 12
    batch = {"x": torch.randn(n, 1, 4, 4), "label": torch.arange(n) % 3}
    torch.manual_seed(5)
    ours = method.loss(module, batch)
    torch.manual_seed(5)
    drop = torch.rand(n) < 0.4
    t, r = meanflow_times(n, 0.5, -0.4, 1.0)
    e = torch.randn_like(batch["x"])
    inside = (t > lo / (1 + lo)) & (t <= hi / (1 + hi))
    assert drop.any() and (~drop & inside).any() and (~drop & ~inside).any() and (r < t).any()

    def u_net(z, t, h, y):
        return module(z, (t * 1000).float(), d.condition(y)["vector"], None, None, interval=(h * 1000).float())

    module.eval()
    theirs = _their_guided_loss(
        u_net, batch["x"], batch["label"], torch.full((n,), 3), e, t.float(), r.float(), drop,
        scale * (1 - kappa), kappa, lo / (1 + lo), hi / (1 + hi), 0.5, 1e-3,
    )  # fmt: skip
    assert torch.allclose(ours, theirs, rtol=1e-4), (ours, theirs)
    t4 = t.float().view(-1, 1, 1, 1)
    z = (1 - t4) * batch["x"] + t4 * e
    v = e - batch["x"]
    cond = d.condition(d.conditioner.where_null(batch["label"], drop))
    v_g = method.guided_target_velocity(module, z, t, v, batch["label"], cond, drop)
    changed = (v_g - v).flatten(1).abs().amax(dim=1) > 1e-3
    assert changed.tolist() == (~drop & inside).tolist()  # guided where kept and inside the interval only


@pytest.mark.parametrize("kappa", [0.0, 0.5, 0.9])
def test_the_guided_velocitys_fixed_point_is_cfg_at_the_scale(kappa):
    """Trained to its fixed point the conditional output u_c equals the mean guided target: with u_c = u_u + s (v_c -
    u_u) and v averaging v_c, the guided velocity of v_c is u_c again (per-sample scales too). The same formula at scale
    1 and kappa 0 is v."""
    g = torch.Generator().manual_seed(0)
    v_c, u_u = torch.randn(2, 4, 1, 3, 3, generator=g)
    s = torch.tensor([1.0, 1.5, 2.0, 4.0])
    u_c = u_u + s.view(-1, 1, 1, 1) * (v_c - u_u)
    assert torch.allclose(guided_velocity(v_c, u_c, u_u, s, kappa), u_c, atol=1e-6)
    v = torch.randn(4, 1, 3, 3, generator=g)
    assert torch.allclose(guided_velocity(v, torch.randn_like(v), u_u, 1.0, 0.0), v)


def test_the_guidance_interval_per_sample_is_the_samplers_rule():
    """Guided where sigma_lo < sigma <= sigma_hi (null bounds: 0 / inf), per sample, and the sampler's scalar check
    agrees in float64 (a noise level one float64 step past the bound is outside)."""
    sigma = torch.tensor([0.0, 0.1, 0.1001, 1.0, 2.0, 2.0 + 4e-16, float("inf")], dtype=torch.float64)
    for interval, (lo, hi) in (([0.1, 2.0], (0.1, 2.0)), ([None, 1.0], (0.0, 1.0)), ([0.5, None], (0.5, math.inf))):
        expected = [lo < float(v) <= hi for v in sigma]
        assert guidance_active_per_sample(sigma, interval).tolist() == expected
        assert [guidance_active(float(v), interval) for v in sigma] == expected
    assert guidance_active_per_sample(sigma, None).all()


def test_guided_targets_skip_scale_one_rows_keep_the_train_mode_and_need_unconditional_training():
    """Per-class scales: a class at scale 1 keeps plain targets (at kappa > 0 the mixed formula would not be v); the
    guidance pass runs in eval mode and leaves the network training; p_uncond = 0 is refused (u_u never trained)."""
    module = _module()
    d = module.diffusion
    method = MeanFlowTraining(target_guidance=CFG(scale=2.0, per_class={1: 1.0}), kappa=0.5)
    n = 9
    labels = torch.arange(n) % 3
    z, v = torch.randn(2, n, 1, 4, 4)
    t = torch.full((n,), 0.5, dtype=torch.float64)
    cond = d.condition(labels)
    seen = []
    module.denoiser.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    module.train()
    v_g = method.guided_target_velocity(module, z, t, v, labels, cond, torch.zeros(n, dtype=torch.bool))
    changed = (v_g - v).flatten(1).abs().amax(dim=1) > 1e-6
    assert changed.tolist() == (labels != 1).tolist()
    assert seen == [False] and module.denoiser.training
    d.p_uncond = 0.0
    with pytest.raises(ConfigError, match="model.diffusion.p_uncond=0.0"):
        method.setup(module, "fit")
    MeanFlowTraining().setup(module, "fit")  # plain targets need no unconditional training


def test_the_target_and_the_adaptive_weight():
    v, du = torch.randn(2, 3, 1, 2, 2)
    t, r = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.1, 0.5, 0.0])
    target = meanflow_target(v, du, t, r)
    assert torch.allclose(target[1], v[1]) and torch.allclose(target[0], v[0] - 0.8 * du[0])
    u = target + 0.1
    sq = torch.full((3,), 0.04)
    assert torch.allclose(adaptive_l2(u, target, 0.0), sq) and torch.allclose(adaptive_l2(u, target, 1.0), sq / 0.041)


def test_the_time_pairs():
    g = torch.Generator().manual_seed(0)
    t, r = meanflow_times(40000, 0.25, -0.4, 1.0, generator=g)
    assert (t >= r).all() and ((t > 0) & (t < 1)).all()
    assert float((t != r).double().mean()) == pytest.approx(0.25, abs=0.01)
    pooled = torch.logit(torch.cat([t[t != r], r[t != r]]))  # both draws of a pair: logit-normal(-0.4, 1)
    assert float(pooled.mean()) == pytest.approx(-0.4, abs=0.03) and float(pooled.std()) == pytest.approx(1.0, abs=0.03)


# ---------------------------------------------------------------- the interval input
@pytest.mark.parametrize("kind", ["unet2d", "dit"])
def test_denoisers_take_an_interval_and_zero_is_the_default(kind):
    torch.manual_seed(0)
    if kind == "unet2d":
        net = UNet2D(in_channels=1, base_channels=8, channel_mults=(1,), attention_levels=(), groups=4,
                     interval_input=True)  # fmt: skip
    else:
        net = DiT(sample_shape=(1, 8, 8), size="T", patch_size=4, interval_input=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 900.0])
    assert torch.allclose(net(x, t), net(x, t, interval=torch.zeros(2)))
    assert not torch.allclose(net(x, t), net(x, t, interval=torch.tensor([300.0, 300.0])))
    plain = UNet2D(in_channels=1, base_channels=8, channel_mults=(1,), attention_levels=(), groups=4)
    with pytest.raises(ValueError, match="interval_input=true"):
        plain(x, t, interval=torch.zeros(2))
    assert not any("interval" in k for k in plain.state_dict())  # old checkpoints keep loading


class ConstantVelocity(nn.Module):
    """u = c everywhere, recording the (t_net, interval) it is asked for."""

    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(c, requires_grad=False)
        self.calls = []

    def forward(self, x, t_net, vector=None, context=None, context_mask=None, interval=None):
        self.calls.append((t_net.clone(), None if interval is None else interval.clone()))
        return self.c.expand_as(x)


@pytest.mark.parametrize("steps", [1, 2])
def test_the_sampler_jumps_each_interval_with_the_average_velocity(steps):
    process = FlowProcess(t_min=0, sampling_shift=0.5)
    module = _module(sampler=functools.partial(meanflow, steps=steps))
    module.diffusion.process = process
    c = torch.randn(1, 1, 4, 4)
    module.denoiser = ConstantVelocity(c)
    noise = torch.randn(3, 1, 4, 4)
    out = module.diffusion.sample(module, 3, noise=noise)
    assert torch.allclose(out, (noise - c).clamp(-1, 1), atol=1e-5)  # z_0 = z_1 - sum (t - r) c
    times = process.sampling_times(steps).tolist()
    assert len(module.denoiser.calls) == steps
    for (t_net, interval), t, r in zip(module.denoiser.calls, times, times[1:]):
        assert torch.allclose(t_net, torch.full((3,), 1000 * t)) and torch.allclose(
            interval, torch.full((3,), 1000 * (t - r))
        )
    if steps == 2:
        assert 0 < times[1] < 0.5  # the grid's shift puts the middle step nearer clean data


def test_other_samplers_see_no_interval():
    module = _module(sampler=functools.partial(euler, steps=2))
    module.denoiser = ConstantVelocity(torch.zeros(1, 1, 4, 4))
    module.diffusion.sample(module, 2)
    assert all(interval is None for _, interval in module.denoiser.calls)


# ---------------------------------------------------------------- refusals
def test_meanflow_refuses_other_processes_samplers_networks_and_settings():
    method = MeanFlowTraining()
    with pytest.raises(ValueError, match="process=flow"):
        method.check(EDMProcess(), functools.partial(meanflow, steps=1))
    with pytest.raises(ValueError, match="sampler=meanflow"):
        method.check(FlowProcess(), functools.partial(euler, steps=1))
    with pytest.raises(ConfigError, match="interval_input=true"):
        method.setup(_module(interval_input=False), "fit")
    with pytest.raises(ConfigError, match="0 <= ratio <= 1"):
        MeanFlowTraining(ratio=1.5)
    with pytest.raises(ConfigError, match="kappa=1"):
        MeanFlowTraining(kappa=1)
    with pytest.raises(ConfigError, match="bakes classifier-free guidance.*APG"):
        MeanFlowTraining(target_guidance=APG(scale=2.0))
    with pytest.raises(ConfigError, match="guidance.rescale=0"):
        MeanFlowTraining(target_guidance=CFG(scale=2.0, rescale=0.7))


# ---------------------------------------------------------------- a real run
MEANFLOW = ["method=meanflow", "process.t_min=0"]


def _tiny(**kw):
    return [a for a in tiny_overrides(**kw) if not a.startswith("sampler.steps")]


@pytest.mark.parametrize("guided", [False, True])
def test_meanflow_trains_and_samples_as_an_ordinary_checkpoint(tmp_path, guided):
    import train
    from difflab.diffusion.system import load_for_sampling

    extra = ["method.target_guidance=${guidance}"] if guided else []
    argv = [*_tiny(max_steps=2), *MEANFLOW, *extra, "logger=csv", f"hydra.run.dir={tmp_path}"]
    assert run_hydra_main(train.main, argv) == 0
    described = [line for line in (tmp_path / "train.log").read_text().splitlines() if "method: MeanFlow" in line]
    assert len(described) == 1 and ("targets guided by CFG(scale=" in described[0]) == guided
    diffusion, net = load_for_sampling(tmp_path / "checkpoints" / "last.ckpt")
    assert diffusion.describe_sampler().startswith("meanflow-1")
    assert net.embed.interval_mlp is not None
    out = diffusion.sample(net, 4)
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()


def test_preflight_refuses_meanflow_on_vp(tmp_path):
    problems = check_config(compose_train(tmp_path, [*_tiny(), "method=meanflow", "process=vp"]), "train")
    assert any("process=flow" in p for p in problems), problems


def test_preflight_refuses_guided_targets_of_another_guidance_method(tmp_path):
    overrides = [*_tiny(), *MEANFLOW, "guidance=apg", "method.target_guidance=${guidance}"]
    problems = check_config(compose_train(tmp_path, overrides), "train")
    assert any("bakes classifier-free guidance" in p for p in problems), problems


@pytest.mark.parametrize("kind", ["unet3d", "video_dit", "vivit"])
def test_meanflow_trains_and_samples_video_denoisers(kind):
    from difflab.models.dit import VideoDiT
    from difflab.models.unet3d import UNet3D
    from difflab.models.vivit import ViViT

    nets = {
        "unet3d": functools.partial(UNet3D, in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                                    attention_levels=(1,), groups=4, head_dim=8, interval_input=True),
        "video_dit": functools.partial(VideoDiT, sample_shape=(1, 2, 8, 8), size="T", patch_size=4, interval_input=True),
        "vivit": functools.partial(ViViT, in_channels=1, patch_size=4, hidden_dim=16, depth=2, head_dim=8,
                                   interval_input=True),
    }  # fmt: skip
    torch.manual_seed(0)
    diffusion = Diffusion(
        FlowProcess(t_min=0),
        Objective(prediction="flow", x0_clip="none"),
        functools.partial(meanflow, steps=1),
        guidance=CFG(scale=1.0),
        conditioner=ClassConditioner(3, embed_dim=4),
        sample_shape=(1, 2, 8, 8),
        p_uncond=0.0,
    )
    module = DiffusionModule(net=nets[kind], diffusion=diffusion)
    with torch.no_grad():
        for p in module.denoiser.parameters():  # off the zero-initialised output layer: gradients reach the input
            p.add_(torch.randn_like(p) * 0.1)
    method = MeanFlowTraining(ratio=1.0)
    method.setup(module, "fit")
    batch = {"x": torch.rand(4, 1, 2, 8, 8) * 2 - 1, "label": torch.tensor([0, 1, 2, 0])}
    loss = method.loss(module, batch)
    loss.backward()
    grad = module.denoiser.embed.interval_mlp[0].weight.grad
    assert loss.isfinite() and grad is not None and grad.abs().sum() > 0  # the interval reaches the loss
    assert module.diffusion.sample(module, 2).shape == (2, 1, 2, 8, 8)
