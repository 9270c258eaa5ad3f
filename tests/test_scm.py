"""Continuous-time consistency models (method=scm, src/methods/scm.py, src/diffusion/consistency.py): sCM's tangent,
normalisation and adaptive-weighted loss against NVIDIA's released sCM code re-typed, the tangent as cos(t) df/dt
through a real denoiser's JVP, TrigFlow's F of a denoiser on an exact flow, the guided teacher's velocity, a real run
(sCD with a teacher, sCT without) that resumes exactly with its learned weighting, and one-line refusals."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from difflab.config_checks import check_config
from difflab.diffusion.consistency import (
    normalize_tangent,
    scm_loss,
    scm_tangent,
    time_derivative,
    time_input_slope,
    trigflow_point,
    trigflow_time,
    trigflow_velocity,
)
from difflab.diffusion.objectives import NoiseLevelWeighting
from difflab.diffusion.processes import EDMProcess, FlowProcess, VPProcess
from difflab.diffusion.samplers import consistency
from difflab.methods.scm import ContinuousConsistency
from difflab.utils.errors import ConfigError
from difflab.utils.frozen import Frozen
from tests.helpers import assert_resumed_equal, compose_train, run_hydra_main
from tests.test_consistency import ExactFlow, _tiny
from tests.test_guidance_methods import _module

torch.set_num_threads(1)


# ---------------------------------------------------------------- the math, against NVlabs' sCM code re-typed
def _their_scm_loss(F_theta, F_theta_jvp_scaled, x_t_hat, dxt_dt, logvar, t_hat, r, sigma_data, c):
    """SCMModel._scm_pred_to_loss (fastgen): g1 = -cos^2 (sigma_d F- - dx/dt); g2 = -(cos sin x + sigma_d jvp), the
    JVP taken with tangents (cos sin dx/dt, cos sin); g = g1 + r g2 normalised; mean square / exp(logvar) + logvar."""
    F_ = F_theta.detach()
    a, s = torch.cos(t_hat).view(-1, 1, 1, 1), torch.sin(t_hat).view(-1, 1, 1, 1)
    g1 = -a * a * (sigma_data * F_ - dxt_dt)
    g2 = -(a * s * x_t_hat + sigma_data * F_theta_jvp_scaled)
    g = g1 + r * g2
    g = g / (torch.linalg.vector_norm(g, dim=(1, 2, 3), keepdim=True) + c)
    unweighted = torch.mean(torch.square(F_theta - F_ - g), dim=(1, 2, 3))
    return unweighted / torch.exp(logvar) + logvar


@pytest.mark.parametrize("r", [0.0, 0.3, 1.0])
def test_the_loss_is_scms_tangent_normalisation_and_adaptive_weighting(r):
    g = torch.Generator().manual_seed(int(r * 10))
    F, dF, x, v = torch.randn(4, 3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(3, generator=g, dtype=torch.float64) * 1.5
    logvar = torch.randn(3, generator=g, dtype=torch.float64)
    cs = (torch.cos(t) * torch.sin(t)).view(-1, 1, 1, 1)
    theirs = _their_scm_loss(F, cs * dF, x, v, logvar, t, r, 0.5, 0.1)
    ours = scm_loss(F, F, normalize_tangent(scm_tangent(F, dF, x, v, t, 0.5, r), 0.1), logvar)
    assert torch.allclose(ours, theirs, rtol=1e-12)


def test_the_weighting_starts_at_zero_and_learns_the_loss_scale():
    """The loss's optimum in logvar is log(mean square): the learned weighting finds it at every noise level."""
    weighting = NoiseLevelWeighting()
    sigma = torch.tensor([0.05, 0.5, 5.0])
    assert torch.equal(weighting(sigma), torch.zeros(3))
    F, g = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2) * torch.tensor([0.1, 1.0, 3.0]).view(-1, 1, 1, 1)
    opt = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        scm_loss(F, F, g, weighting(sigma)).sum().backward()
        opt.step()
    assert torch.allclose(weighting(sigma), torch.tensor([0.01, 1.0, 9.0]).log(), atol=0.05)


def test_trigflow_point_and_velocity():
    x0, eps = torch.randn(2, 3, 1, 2, 2)
    t = torch.tensor([0.0, 0.7, math.pi / 2], dtype=torch.float64)
    x = trigflow_point(x0, eps, t, 0.5)
    assert torch.allclose(x[0], x0[0]) and torch.allclose(x[2], 0.5 * eps[2], atol=1e-7)
    h = 1e-4
    central = (trigflow_point(x0, eps, t + h, 0.5) - trigflow_point(x0, eps, t - h, 0.5)) / (2 * h)
    assert torch.allclose(trigflow_velocity(x0, eps, t, 0.5), central, atol=1e-3)
    assert torch.allclose(trigflow_time(torch.tensor([0.5]), 0.5), torch.tensor([math.pi / 4]))


# ---------------------------------------------------------------- through a denoiser
def test_the_tangent_is_cos_t_times_the_derivative_of_the_consistency_function():
    """With warmup 1, g = cos(t) df-/dt for f = cos t x - sin t sigma_d F (the consistency function, the model's x0),
    both sides through a real UNet's JVP; F's x0 is the denoiser's own x0 estimate."""
    torch.manual_seed(0)
    module = _module("flow")
    with torch.no_grad():
        for p in module.denoiser.parameters():  # off the zero-initialised output layers
            p.add_(torch.randn_like(p) * 0.05)
    d = module.diffusion
    cond = d.condition(torch.tensor([0, 1, 2]))
    t = torch.tensor([0.3, 0.9, 1.3], dtype=torch.float64)
    x, v = torch.randn(2, 3, 1, 4, 4)
    F = lambda x, t: ContinuousConsistency.trigflow_output(d, module.eval(), x, t, cond)  # noqa: E731
    F_minus, dF = time_derivative(F, x, t, v)
    cos = torch.cos(t).float().view(-1, 1, 1, 1)
    f = lambda x, t: torch.cos(t).float().view(-1, 1, 1, 1) * x - torch.sin(t).float().view(-1, 1, 1, 1) * 0.5 * F(x, t)  # noqa: E731
    f_minus, df = time_derivative(f, x, t, v)
    assert torch.allclose(scm_tangent(F_minus, dF, x, v, t, 0.5), cos * df, atol=1e-4)
    x_p, time = ContinuousConsistency.process_point(d, x, t)
    assert torch.allclose(f_minus, d.x0_estimate(module, x_p, time, cond), atol=1e-5)
    assert torch.allclose(time, torch.tan(t) * 0.5 / (1 + torch.tan(t) * 0.5))  # flow's t = sigma / (1 + sigma)


def test_trigflow_output_of_an_exact_flow_is_the_true_velocity():
    """Flow data that is one point: the exact field's F sigma_d is the velocity of x = cos t x* + sin t sigma_d eps."""
    module = _module("flow")
    point = torch.randn(1, 1, 4, 4)
    module.denoiser = ExactFlow(point)
    d = module.diffusion
    t = torch.tensor([0.2, 0.8, 1.4], dtype=torch.float64)
    eps = torch.randn(3, 1, 4, 4)
    x = trigflow_point(point.expand(3, -1, -1, -1), eps, t, 0.5)
    F = ContinuousConsistency.trigflow_output(d, module, x, t, d.condition(torch.tensor([0, 1, 2])))
    assert torch.allclose(0.5 * F, trigflow_velocity(point.expand(3, -1, -1, -1), eps, t, 0.5), atol=1e-4)
    method = ContinuousConsistency(teacher_ckpt="in-memory")
    method._teacher = Frozen(module)
    guided = method.teacher_velocity(x, torch.tensor([0, 1, 2]), t)  # CFG 2 of an exact field is exact
    assert torch.allclose(guided, 0.5 * F, atol=1e-4)


def test_the_loss_trains_the_network_and_the_weighting():
    module = _module("flow")
    method = ContinuousConsistency(warmup_steps=0)
    batch = {"x": torch.randn(6, 1, 4, 4), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    loss = method.loss(module, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert method.weighting is not None and method.weighting.linear.bias.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.denoiser.parameters())
    assert method.parameters() and not any(k.startswith("method") for k in module.state_dict())


def test_scm_refuses_a_discrete_process_and_bad_settings():
    with pytest.raises(ValueError, match="continuous process"):
        ContinuousConsistency().check(VPProcess("cosine", 50), functools.partial(consistency, steps=1))
    ContinuousConsistency().check(FlowProcess(), functools.partial(consistency, steps=2))
    with pytest.raises(ConfigError, match="tangent_c > 0"):
        ContinuousConsistency(tangent_c=0)


@pytest.mark.parametrize("time_scale", [1.0, 1000.0])
def test_time_input_slope_is_the_closed_form_derivative(time_scale):
    """Flow: net_time = s sigma / (1 + sigma), sigma = sigma_d tan t, so d net_time / dt = s sigma_d / (cos t +
    sigma_d sin t)^2; EDM: s ln(sigma) / 4, so s / (4 sin t cos t). The largest over the central 98% of
    lognormal(-1, 1.4) noise levels."""
    sd, z = 0.5, torch.linspace(-2.3263, 2.3263, 1025, dtype=torch.float64)
    t = torch.atan((-1.0 + 1.4 * z).exp() / sd)
    flow = time_scale * sd / (torch.cos(t) + sd * torch.sin(t)) ** 2
    edm = time_scale / (4 * torch.sin(t) * torch.cos(t))
    got = time_input_slope(FlowProcess(time_scale=time_scale), sd, -1.0, 1.4)
    assert got == pytest.approx(float(flow.max()), rel=1e-2)
    got = time_input_slope(EDMProcess(time_scale=time_scale), sd, -1.0, 1.4)
    assert got == pytest.approx(float(edm.max()), rel=1e-2)


def _scm_warnings(caplog) -> list[str]:
    """The method's own warnings among what caplog holds (building a module logs at INFO elsewhere)."""
    return [r.getMessage() for r in caplog.records if r.name == "difflab.methods.scm" and r.levelname == "WARNING"]


def test_scm_warns_of_a_steep_time_input_at_setup(caplog):
    module = _module("flow")
    module.diffusion.sampler = functools.partial(consistency, steps=1)
    with caplog.at_level("WARNING", logger="difflab.methods.scm"):
        ContinuousConsistency().setup(module, "validate")
    assert _scm_warnings(caplog) == []  # only before training
    with caplog.at_level("WARNING", logger="difflab.methods.scm"):
        ContinuousConsistency().setup(module, "fit")
    assert any(
        "moves 1642 units per unit of TrigFlow time (process.time_scale=1000)" in m for m in _scm_warnings(caplog)
    )
    assert math.isnan(time_input_slope(VPProcess("cosine", 50), 0.5, -1.0, 1.4))  # discrete: no slope to speak of


def test_scm_warns_of_a_steep_time_input_only(caplog):
    module = _module("flow")
    with caplog.at_level("WARNING", logger="difflab.methods.scm"):
        steep = ContinuousConsistency().warn_if_steep(module.diffusion)
    assert steep > 500 and "process.time_scale=1000" in caplog.text and "process.time_scale=1 " in caplog.text
    caplog.clear()
    module.diffusion.process = FlowProcess(time_scale=1.0)
    with caplog.at_level("WARNING", logger="difflab.methods.scm"):
        assert ContinuousConsistency().warn_if_steep(module.diffusion) < 2.5
    assert _scm_warnings(caplog) == []


# ---------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def teacher_ckpt(run_dir):
    return run_dir / "checkpoints" / "last.ckpt"


SCM = ["method=scm", "process.t_min=0", "method.warmup_steps=2", "method.time_groups=4"]


def _train(tmp, *extra, max_steps=4):
    import train

    argv = [*_tiny(max_steps=max_steps), *SCM, "logger=csv", f"hydra.run.dir={tmp}", *extra]
    return run_hydra_main(train.main, argv)


def test_scm_distillation_runs_and_resumes_exactly_with_its_weighting(teacher_ckpt, tmp_path):
    from difflab.checkpoints import load_checkpoint
    from difflab.diffusion.system import load_for_sampling

    teacher = f"method.teacher_ckpt={teacher_ckpt}"
    assert _train(tmp_path / "run", teacher) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert _train(tmp_path / "resumed", teacher, f"ckpt_path={ckpts / 'step_0000002.ckpt'}") == 0
    final = load_checkpoint(ckpts / "step_0000004.ckpt")
    again = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_0000004.ckpt")
    assert final["difflab_method"]["weighting"]["linear.bias"].abs().sum() > 0  # it learned
    assert_resumed_equal(final, again)
    diffusion, net = load_for_sampling(ckpts / "last.ckpt")
    assert diffusion.describe_sampler().startswith("consistency-1")
    out = diffusion.sample(net, 4)
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()


def test_sct_without_a_teacher_runs(tmp_path):
    assert _train(tmp_path / "sct", "method.adaptive_weighting=false", max_steps=2) == 0
    assert (tmp_path / "sct" / "checkpoints" / "last.ckpt").is_file()


def test_preflight_refuses_scm_on_vp(tmp_path):
    problems = check_config(compose_train(tmp_path, [*_tiny(), "method=scm", "process=vp"]), "train")
    assert any("continuous process" in p for p in problems), problems


def test_a_teacher_of_another_time_input_is_refused_before_the_run_and_at_load(teacher_ckpt, tmp_path):
    """A student that sees t (process.time_scale=1, as experiment=digits_scm sets) and a teacher that saw 1000 t: the
    pre-flight names the key and both values; loading it (the run's own check) names the time input."""
    from difflab.checkpoints import module_from_checkpoint
    from difflab.methods.teacher import load_teacher

    cfg = compose_train(tmp_path, [*_tiny(), *SCM, f"method.teacher_ckpt={teacher_ckpt}", "process.time_scale=1"])
    problems = check_config(cfg, "train")
    assert any("time_scale=1000.0 where this run has 1" in p for p in problems), problems
    student = module_from_checkpoint(teacher_ckpt).diffusion
    student.process = FlowProcess(time_scale=1.0)
    with pytest.raises(
        ConfigError,
        match=r"cannot teach this model: different time input at the same noise level "
        r"\(teacher 993.3, student 0.9933\): give both the same process.time_scale$",
    ):
        load_teacher(str(teacher_ckpt), student)
