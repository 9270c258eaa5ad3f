"""Diffusion training with EDM2's learned loss weighting (``method.adaptive_weighting``, src/methods/base.py): the
loss against EDM2's released form re-typed, its optimum in closed form, the noise level the weighting sees on each
process, the weighting learning each level's loss, and a real run that resumes exactly and samples as an ordinary
checkpoint."""

from __future__ import annotations

import pytest
import torch

from difflab.diffusion.objectives import NoiseLevelWeighting, uncertainty_weighted
from difflab.methods.base import DiffusionTraining
from tests.helpers import assert_resumed_equal, run_hydra_main, tiny_overrides
from tests.test_guidance_methods import _module

torch.set_num_threads(1)


def _their_edm2_loss(denoised, images, weight, logvar):
    """EDM2Loss.__call__ (NVlabs/edm2 training/training_loop.py), per element: weight / exp(logvar) * (D - y)^2 +
    logvar, logvar the network's per-sample output broadcast over the image."""
    return (weight / logvar.exp()) * ((denoised - images) ** 2) + logvar


def test_the_loss_is_edm2s_uncertainty_form():
    g = torch.Generator().manual_seed(0)
    denoised, images = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    weight = torch.rand(5, 1, 1, 1, generator=g) + 0.5
    logvar = torch.randn(5, generator=g)
    theirs = _their_edm2_loss(denoised, images, weight, logvar.view(-1, 1, 1, 1)).mean(dim=(1, 2, 3))
    ours = uncertainty_weighted((weight * (denoised - images) ** 2).mean(dim=(1, 2, 3)), logvar)
    assert torch.allclose(ours, theirs, rtol=1e-6)


def test_the_optimum_in_logvar_is_the_log_of_the_loss():
    loss = torch.tensor([0.01, 0.3, 4.0])
    u = loss.log().requires_grad_()
    uncertainty_weighted(loss, u).sum().backward()
    assert u.grad is not None and torch.allclose(u.grad, torch.zeros(3), atol=1e-6)
    at_optimum = uncertainty_weighted(loss, loss.log())
    assert torch.allclose(at_optimum, 1 + loss.log())
    for step in (-0.2, 0.2):
        assert (uncertainty_weighted(loss, loss.log() + step) > at_optimum).all()


@pytest.mark.parametrize("process_name", ["vp", "flow"])
def test_the_weighting_sees_each_samples_edm_noise_level(process_name, monkeypatch):
    """sigma = sigma_t / alpha_t of the drawn time, whatever the process; at the start (u = 0) the loss is the plain
    diffusion loss of the same draws."""
    module = _module(process_name)
    batch = {"x": torch.randn(8, 1, 4, 4), "label": torch.arange(8) % 3}
    method = DiffusionTraining(adaptive_weighting=True)
    seen: dict[str, torch.Tensor] = {}
    losses = module.diffusion.losses

    def spy(*args, **kwargs):
        seen.update(losses(*args, **kwargs))
        return seen

    monkeypatch.setattr(module.diffusion, "losses", spy)
    forward = NoiseLevelWeighting.forward
    monkeypatch.setattr(NoiseLevelWeighting, "forward", lambda self, s: seen.update(sigma=s) or forward(self, s))
    torch.manual_seed(3)
    weighted = method.loss(module, batch)
    monkeypatch.undo()
    path = module.diffusion.objective.path_at(module.diffusion.process, seen["t"], batch["x"])
    expected = (path["sigma"] / path["alpha"]).double().flatten()
    assert torch.allclose(seen["sigma"].double(), expected, rtol=1e-5)
    torch.manual_seed(3)
    plain = DiffusionTraining().loss(module, batch)
    assert torch.allclose(weighted, plain, rtol=1e-6)


class Echo(torch.nn.Module):
    """A fixed "network" that returns its input: on flow its velocity error is (2 - t) x0 - (1 - t) eps, so the mean
    loss differs by level (about 4.4 at t = 0.1, 1.2 at t = 0.9 on unit data)."""

    def __init__(self, diffusion):
        super().__init__()
        self.diffusion = diffusion

    def forward(self, x, *args, **kwargs):
        return x


def test_the_weighting_learns_each_levels_loss_and_the_network_gets_gradients():
    """With the network fixed, u(sigma) settles at ln E[loss | sigma] (the closed-form optimum) at every level."""
    module = _module("flow")
    module.diffusion.process.density = "uniform"  # every level drawn as often
    echo = Echo(module.diffusion)
    method = DiffusionTraining(adaptive_weighting=True)
    opt = torch.optim.Adam(method.parameters(), lr=0.03)
    decay = torch.optim.lr_scheduler.MultiStepLR(opt, [400, 600], gamma=0.2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 4, 4, generator=g)
    labels = torch.arange(256) % 3
    for _ in range(800):
        opt.zero_grad()
        method.loss(echo, {"x": x[:128], "label": labels[:128]}).backward()
        opt.step()
        decay.step()
    levels = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    batch = {"x": x, "label": labels}
    mean_loss = torch.stack([echo.diffusion.losses(echo, batch, t=t.repeat(256))["loss"].mean() for t in levels])
    assert mean_loss.log().max() - mean_loss.log().min() > 1.0  # the levels differ: the test can tell them apart
    u = method.weighting(levels / (1 - levels))  # flow: sigma = t / (1 - t)
    assert torch.allclose(u, mean_loss.float().log(), atol=0.2), (u, mean_loss.log())

    method.loss(module, {"x": x[:8], "label": labels[:8]}).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.denoiser.parameters())


def test_zero_terminal_snr_keeps_the_loss_finite():
    """vp with zero terminal SNR draws sigma = inf at its last step: the weighting's input is clamped, not NaN."""
    from difflab.diffusion.processes import VPProcess

    weighting = NoiseLevelWeighting()
    weighting.linear.bias.data.fill_(0.3)
    assert torch.isfinite(weighting(torch.tensor([0.0, 1.0, float("inf")], dtype=torch.float64))).all()
    module = _module("vp")
    module.diffusion.process = VPProcess("cosine", 4, zero_terminal_snr=True)  # 1 in 4 draws at sigma = inf
    method = DiffusionTraining(adaptive_weighting=True)
    seen = []
    module.diffusion.losses = lambda *a, _f=module.diffusion.losses, **k: seen.append(_f(*a, **k)) or seen[-1]
    loss = method.loss(module, {"x": torch.randn(32, 1, 4, 4), "label": torch.arange(32) % 3})
    assert torch.isinf(-seen[0]["log_snr"]).any() and torch.isfinite(loss)
    loss.backward()
    assert method.weighting is not None and torch.isfinite(method.weighting.linear.weight.grad).all()


def test_resuming_with_the_other_setting_is_refused_in_one_line():
    from difflab.utils.errors import ConfigError

    learned = DiffusionTraining(adaptive_weighting=True).state_dict()
    with pytest.raises(ConfigError, match=r"did not learn a loss weighting .*does \(method.adaptive_weighting\)"):
        DiffusionTraining(adaptive_weighting=True).load_state_dict({})
    with pytest.raises(ConfigError, match="learned a loss weighting .*method=diffusion does not"):
        DiffusionTraining().load_state_dict(learned)
    DiffusionTraining().load_state_dict({})  # the plain method, as before
    again = DiffusionTraining(adaptive_weighting=True)
    again.load_state_dict(learned)
    assert again.weighting is not None


def test_a_learned_weighting_is_refused_under_fsdp(monkeypatch):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from difflab.utils.errors import ConfigError

    module = _module("flow")
    module.method = DiffusionTraining(adaptive_weighting=True)
    trainer = type("T", (), {"strategy": ModelParallelStrategy.__new__(ModelParallelStrategy)})()
    monkeypatch.setattr(module, "_trainer", trainer)
    with pytest.raises(ConfigError, match="trainer=fsdp"):
        module.configure_optimizers()


def test_a_run_learns_the_weighting_resumes_exactly_and_samples(tmp_path):
    import train
    from difflab.checkpoints import load_checkpoint
    from difflab.diffusion.system import load_for_sampling

    def run(out, *extra):
        argv = [*tiny_overrides(max_steps=4), "method.adaptive_weighting=true", "logger=csv", f"hydra.run.dir={out}"]
        return run_hydra_main(train.main, [*argv, *extra])

    assert run(tmp_path / "run") == 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert run(tmp_path / "resumed", f"ckpt_path={ckpts / 'step_0000002.ckpt'}") == 0
    final = load_checkpoint(ckpts / "step_0000004.ckpt")
    again = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_0000004.ckpt")
    assert final["difflab_method"]["weighting"]["linear.bias"].abs().sum() > 0  # it learned
    assert_resumed_equal(final, again)
    assert not any("weighting" in k for k in final["state_dict"])  # the weights stay an ordinary checkpoint
    assert "adaptive weighting" in (tmp_path / "run" / "train.log").read_text()
    diffusion, net = load_for_sampling(ckpts / "last.ckpt")
    out = diffusion.sample(net, 4, torch.arange(4))
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()
