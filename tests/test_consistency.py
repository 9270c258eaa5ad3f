"""Consistency training (method=consistency, src/methods/consistency.py, src/diffusion/consistency.py,
sampler=consistency): ECT's gap schedule and loss against the authors' released code re-typed, the multistep
consistency sampler, the boundary condition, the teacher's guided step on an exact flow, shared dropout, a real run
(with a teacher and without) that resumes exactly, and one-line refusals."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from difflab.config_checks import check_config
from difflab.diffusion.consistency import (
    consistency_loss,
    ect_earlier_sigma,
    ict_huber_c,
    pseudo_huber,
    time_derivative,
)
from difflab.diffusion.processes import EDMProcess, FlowProcess, VPProcess
from difflab.diffusion.samplers import consistency, ddim
from difflab.methods.consistency import ConsistencyTraining, same_randomness
from difflab.utils.errors import ConfigError
from difflab.utils.frozen import Frozen
from tests.helpers import compose_train, run_hydra_main, tiny_overrides
from tests.test_guidance_methods import _module

torch.set_num_threads(1)


# ---------------------------------------------------------------- the math, against locuslab/ect re-typed
def _their_t_to_r(t, stage, q=2.0, k=8.0, b=1.0):
    """ECMLoss.t_to_r_sigmoid: adj = 1 + k sigmoid(-b t); decay = 1 / q^(stage + 1); r = t (1 - decay adj), >= 0."""
    adj = 1 + k * torch.sigmoid(-b * t)
    decay = 1 / q ** (stage + 1)
    return torch.clamp(t * (1 - decay * adj), min=0)


@pytest.mark.parametrize("stage", [0, 1, 3, 7])
def test_the_earlier_sigma_is_ects_mapping(stage):
    sigma = torch.exp(torch.linspace(-6, 4, 50, dtype=torch.float64))
    ours = ect_earlier_sigma(sigma, stage)
    assert torch.allclose(ours, _their_t_to_r(sigma, stage), rtol=1e-12)
    assert (ours < sigma).all() and (ours >= 0).all()
    if stage >= 3:  # the gap shrinks with the stage
        assert ((sigma - ours) < (sigma - ect_earlier_sigma(sigma, stage - 1))).all()


@pytest.mark.parametrize("c", [0.0, 0.03])
def test_the_loss_is_ects_pseudo_huber_over_the_gap(c):
    g = torch.Generator().manual_seed(0)
    f_t, f_r = torch.randn(2, 4, 1, 3, 3, generator=g)
    sigma_t = torch.rand(4, generator=g) + 0.5
    sigma_r = sigma_t * 0.6
    squared = torch.sum(((f_t - f_r) ** 2).reshape(4, -1), dim=-1)  # their L2, summed per sample
    theirs = (torch.sqrt(squared + c**2) - c if c > 0 else torch.sqrt(squared)) / (sigma_t - sigma_r)
    assert torch.allclose(consistency_loss(f_t, f_r, sigma_t, sigma_r, c), theirs, rtol=1e-6)


def test_icts_huber_constant_and_the_metric_near_zero():
    assert ict_huber_c(3 * 32 * 32) == pytest.approx(0.0299, abs=1e-4)  # iCT's 0.03 on CIFAR-10
    small = torch.tensor([1e-8], dtype=torch.float64)
    assert pseudo_huber(small, 0.03) == pytest.approx(small / (2 * 0.03), rel=1e-3)  # quadratic near 0


# ---------------------------------------------------------------- the JVP through the denoisers
def _jvp_denoisers():
    from difflab.models.dit import DiT
    from difflab.models.unet2d import UNet2D

    unet = UNet2D(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(1,), groups=4, head_dim=8,
                  cond_dim=8)  # fmt: skip
    return {"unet2d with self-attention": unet, "dit": DiT(sample_shape=(1, 8, 8), size="T", patch_size=4, cond_dim=8)}


def _check_time_derivative(net, sample_shape):
    """df/dt of ``net`` (perturbed off its zero-initialised output layers) by ``time_derivative`` against central
    differences whose error falls as h^2; returns (f, x, t, v) for further checks."""
    torch.manual_seed(0)
    net = net.eval()
    with torch.no_grad():
        for p in net.parameters():  # off the zero-initialised output layers, so the derivative is not 0
            p.add_(torch.randn_like(p) * 0.05)
    x, v = torch.randn(2, 2, *sample_shape)
    t, c = torch.tensor([300.0, 700.0]), torch.randn(2, 8)
    f = lambda x, t: net(x, t, c)  # noqa: E731
    out, dfdt = time_derivative(f, x, t, v)
    assert torch.allclose(out, f(x, t), atol=1e-5)
    errors = []
    for h in (0.1, 0.03):
        central = (f(x + h * v, t + h) - f(x - h * v, t - h)) / (2 * h)
        errors.append(float((dfdt - central).abs().max()))
    assert errors[1] < errors[0] / 4 and errors[1] < 0.01 * float(dfdt.abs().max())
    return f, x, t, v


@pytest.mark.parametrize("name", ["unet2d with self-attention", "dit"])
def test_the_time_derivative_through_a_denoiser_matches_finite_differences(name):
    """df/dt along (dx/dt, 1) by forward mode equals the central difference (error shrinking as h^2), for the
    UNet and the DiT, attention included; without the math backend the fused CPU kernel has no forward AD."""
    f, x, t, v = _check_time_derivative(_jvp_denoisers()[name], (1, 8, 8))
    with pytest.raises(NotImplementedError, match="forward AD"):  # what attention needs: the math backend
        torch.func.jvp(f, (x, t), (v, torch.ones_like(t)))


def _video_denoisers():
    from difflab.models.dit import VideoDiT
    from difflab.models.unet3d import UNet3D
    from difflab.models.vivit import ViViT

    return {
        "unet3d with temporal attention and transformer blocks": UNet3D(
            in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
            num_transformer_blocks=1, transformer_head_dim=8, groups=4, head_dim=8, cond_dim=8,
        ),
        "video dit, factorised attention": VideoDiT(sample_shape=(1, 2, 8, 8), size="T", patch_size=4, cond_dim=8),
        "vivit": ViViT(in_channels=1, patch_size=4, hidden_dim=16, depth=2, head_dim=8, cond_dim=8),
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(_video_denoisers()))
def test_the_time_derivative_through_a_video_denoiser_matches_finite_differences(name):
    """The same JVP through the video denoisers (B x C x T x H x W), attention on the math backend."""
    _check_time_derivative(_video_denoisers()[name], (1, 2, 8, 8))


# ---------------------------------------------------------------- the sampler
def test_one_consistency_step_is_the_models_x0_from_noise():
    process = FlowProcess(t_min=0)
    x0 = torch.randn(3, 1, 2, 2)
    seen = []

    def model_fn(x, t):
        seen.append(t)
        return x0 * (1 + t), x

    out = consistency(model_fn, torch.randn(3, 1, 2, 2), process, steps=1)
    assert seen == [1.0] and torch.allclose(out, 2 * x0)


def test_multistep_consistency_renoises_to_each_grid_time():
    process = FlowProcess(t_min=0, sampling_shift=0.33)
    x0, noise = torch.randn(2, 3, 1, 2, 2)
    seen = []

    def model_fn(x, t):
        seen.append((t, x.clone()))
        return x0 + t, x

    out = consistency(model_fn, noise, process, steps=2, generator=torch.Generator().manual_seed(4))
    t_mid = float(process.sampling_times(2)[1])
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    assert seen[0][0] == pytest.approx(1.0) and torch.equal(seen[0][1], noise)
    assert seen[1][0] == pytest.approx(t_mid) and 0 < t_mid < 0.5  # the grid's shift puts it below the middle
    assert torch.allclose(seen[1][1], (1 - t_mid) * (x0 + 1.0) + t_mid * z, atol=1e-6)  # x0 at t=1, noised afresh
    assert torch.allclose(out, x0 + t_mid, atol=1e-6)  # the last step's x0


# ---------------------------------------------------------------- the method's pieces
def test_the_consistency_function_is_the_identity_at_clean_data():
    module = _module("flow")
    x = torch.randn(4, 1, 4, 4)
    cond = module.diffusion.condition(torch.tensor([0, 1, 2, 0]))
    assert torch.allclose(module.diffusion.x0_estimate(module, x, torch.zeros(4), cond), x, atol=1e-6)


class ExactFlow(nn.Module):
    """The exact velocity of flow data that is one point: v(x_t, t) = (x_t - x*) / t."""

    def __init__(self, point):
        super().__init__()
        self.point = nn.Parameter(point, requires_grad=False)

    def forward(self, x, t_net, vector=None, context=None, context_mask=None):
        t = (t_net / 1000).view(-1, *([1] * (x.ndim - 1)))
        return (x - self.point) / t


def test_the_teachers_guided_step_lands_on_the_exact_trajectory():
    module = _module("flow")
    point = torch.randn(1, 1, 4, 4)
    module.denoiser = ExactFlow(point)
    method = ConsistencyTraining(teacher_ckpt="in-memory", time_groups=3)
    method._teacher = Frozen(module)
    torch.manual_seed(0)
    t, r = method.times(6, module.diffusion.process, torch.device("cpu"))
    assert len(t.unique()) == 3 and (r < t).all()
    noise = torch.randn(6, 1, 4, 4)
    x_t = ((1 - t.view(-1, 1, 1, 1)) * point + t.view(-1, 1, 1, 1) * noise).float()
    x_r = method.teacher_step(x_t, torch.tensor([0, 1, 2, 0, 1, 2]), t, r)  # CFG 2 of an exact field: exact
    want = (1 - r.view(-1, 1, 1, 1)) * point + r.view(-1, 1, 1, 1) * noise
    assert torch.allclose(x_r, want.float(), atol=1e-5)


def test_the_loss_without_a_teacher_targets_the_data_where_the_gap_reaches_zero():
    """k huge: every sigma_r is 0, so the target is the data and the loss is ||f(x_t, t) - x0|| / sigma_t."""
    module = _module("flow")
    d = module.diffusion
    d.p_uncond = 0.0
    method = ConsistencyTraining(k=1e9, huber_c=0.0)
    batch = {"x": torch.randn(5, 1, 4, 4), "label": torch.tensor([0, 1, 2, 0, 1])}
    torch.manual_seed(1)
    loss = method.loss(module, batch)
    torch.manual_seed(1)
    raw = d.conditioner.drop(batch["label"], 0.0)
    sigma_t = (torch.randn(5, dtype=torch.float64) * 2.0 - 1.1).exp()
    t = (sigma_t / (1 + sigma_t)).float()
    noise = torch.randn_like(batch["x"])
    x_t = (1 - t.view(-1, 1, 1, 1)) * batch["x"] + t.view(-1, 1, 1, 1) * noise
    f_t = d.x0_estimate(module, x_t, t.double(), d.condition(raw))
    want = ((f_t - batch["x"]) ** 2).flatten(1).sum(1).sqrt() / sigma_t.float()
    assert torch.allclose(loss, want.mean(), rtol=1e-4)


def test_both_calls_of_a_pair_see_the_same_dropout():
    drop = nn.Dropout(0.5).train()
    x = torch.ones(1000)
    with same_randomness(torch.device("cpu")):
        first = drop(x)
    assert torch.equal(first, drop(x))
    assert not torch.equal(first, drop(x))  # the state moves on afterwards


def test_consistency_refuses_a_discrete_process_another_sampler_and_bad_settings():
    method = ConsistencyTraining()
    with pytest.raises(ValueError, match="continuous process"):
        method.check(VPProcess("cosine", 50), functools.partial(consistency, steps=1))
    with pytest.raises(ValueError, match="sampler=consistency"):
        method.check(FlowProcess(), functools.partial(ddim, steps=1))
    method.check(EDMProcess(), functools.partial(consistency, steps=2))
    with pytest.raises(ConfigError, match="p_std > 0"):
        ConsistencyTraining(p_std=0)


# ---------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def teacher_ckpt(run_dir):
    return run_dir / "checkpoints" / "last.ckpt"


CONSISTENCY = ["method=consistency", "process.t_min=0", "method.double_every=2", "method.time_groups=4"]


def _tiny(**kw):
    return [a for a in tiny_overrides(**kw) if not a.startswith("sampler.steps")]


def _train(tmp, *extra, max_steps=4):
    import train

    argv = [*_tiny(max_steps=max_steps), *CONSISTENCY, "logger=csv", f"hydra.run.dir={tmp}", *extra]
    return run_hydra_main(train.main, argv)


def test_consistency_distillation_runs_and_resumes_exactly(teacher_ckpt, tmp_path):
    from difflab.checkpoints import load_checkpoint
    from difflab.diffusion.system import load_for_sampling

    teacher = f"method.teacher_ckpt={teacher_ckpt}"
    assert _train(tmp_path / "run", teacher) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert _train(tmp_path / "resumed", teacher, f"ckpt_path={ckpts / 'step_0000002.ckpt'}") == 0
    final = load_checkpoint(ckpts / "step_0000004.ckpt")
    again = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_0000004.ckpt")
    for k, v in final["state_dict"].items():
        assert torch.allclose(v, again["state_dict"][k], atol=1e-6), k
    diffusion, net = load_for_sampling(ckpts / "last.ckpt")
    assert diffusion.describe_sampler().startswith("consistency-1")
    out = diffusion.sample(net, 4)
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()


def test_ect_without_a_teacher_trains_from_this_runs_weights(tmp_path):
    assert _train(tmp_path / "ect", max_steps=2) == 0
    assert (tmp_path / "ect" / "checkpoints" / "last.ckpt").is_file()


def _problems(tmp_path, *overrides):
    return check_config(compose_train(tmp_path, [*_tiny(), *overrides]), "train")


def test_preflight_refuses_consistency_on_vp_or_with_another_sampler(teacher_ckpt, tmp_path):
    problems = _problems(tmp_path, "method=consistency", "process=vp")
    assert any("continuous process" in p for p in problems), problems
    problems = _problems(tmp_path, *CONSISTENCY, f"method.teacher_ckpt={teacher_ckpt}", "sampler=ddim")
    assert any("sampler=consistency" in p for p in problems), problems
    assert _problems(tmp_path, *CONSISTENCY, f"method.teacher_ckpt={teacher_ckpt}") == []
