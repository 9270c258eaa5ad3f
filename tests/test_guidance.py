"""Classifier-free guidance: the scale convention (scale = 1 + w), per-class scales, rescale phi, the sigma interval
and the guided model function's (x0, eps) pair."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from difflab.diffusion.guidance import cfg_combine, check_interval, guidance_active, guided_model_fn, rescale_guidance
from difflab.diffusion.objectives import Objective, X0Clip
from difflab.diffusion.processes import VPProcess
from difflab.diffusion.samplers import ddim


def _pair(seed=0, shape=(4, 2, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_scale_is_one_plus_w():
    c, u = _pair()
    assert torch.allclose(cfg_combine(c, u, 1.0), c, atol=1e-6), "scale 1 = plain conditional"
    assert torch.equal(cfg_combine(c, u, 0.0), u), "scale 0 = unconditional"
    w = 2.5
    assert torch.allclose(cfg_combine(c, u, 1 + w), (1 + w) * c - w * u, atol=1e-6)  # Ho & Salimans' w


def test_per_sample_scales():
    c, u = _pair()
    scales = torch.tensor([1.0, 0.0, 3.0, 7.5])
    out = cfg_combine(c, u, scales)
    for i, s in enumerate(scales.tolist()):
        assert torch.allclose(out[i], u[i] + s * (c[i] - u[i]))


def test_rescale_matches_conditional_std():
    c, u = _pair()
    guided = cfg_combine(c, u, 7.0)
    assert torch.equal(rescale_guidance(guided, c, 0.0), guided)
    full = rescale_guidance(guided, c, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)), rtol=1e-5)
    part = rescale_guidance(guided, c, 0.7)
    assert torch.allclose(part, 0.7 * full + 0.3 * guided, atol=1e-6)


def test_interval_bounds():
    assert guidance_active(5.0, None)
    assert guidance_active(2.0, [0.3, 2.0]) and not guidance_active(0.3, [0.3, 2.0])
    assert not guidance_active(2.01, [0.3, 2.0])
    assert guidance_active(float("inf"), [1.0, None]) and guidance_active(1e-3, [None, 1.0])
    with pytest.raises(ValueError, match="interval"):
        check_interval([2.0, 1.0])
    with pytest.raises(ValueError, match="interval"):
        check_interval([1.0])


class CondNet:
    """Records batch sizes; output depends on the condition vector (cond rows = +1, null rows = -1)."""

    def __init__(self):
        self.batches = []

    def __call__(self, x_t, t, cond):
        self.batches.append(x_t.shape[0])
        return 0.5 * x_t + cond["vector"].view(-1, 1, 1, 1)


def _conds(n):
    return {"vector": torch.ones(n), "context": None, "context_mask": None}, {
        "vector": -torch.ones(n),
        "context": None,
        "context_mask": None,
    }


def test_guided_model_fn_passes_and_interval():
    sch = VPProcess("cosine", 100)
    x = torch.randn(3, 1, 4, 4)
    cond, null = _conds(3)
    net = CondNet()
    plain = guided_model_fn(net, sch, "eps", cond, null, scale=1.0)
    plain(x, 50)
    assert net.batches == [3], "scale 1: one conditional pass"
    lo, hi = float(sch.sigmas[20]), float(sch.sigmas[60])
    guided = guided_model_fn(net, sch, "eps", cond, null, scale=3.0, interval=[lo, hi])
    net.batches.clear()
    for t in (10, 20, 21, 60, 61, 99):
        guided(x, t)
    assert net.batches == [3, 3, 6, 6, 3, 3], "guided (batched 2B) only for sigma in (lo, hi]"
    # guided eps = u + 3 (c - u) = 0.5 x + (-1 + 3 * 2)
    x0, eps = guided(x, 40)
    assert torch.allclose(eps, 0.5 * x + 5.0, atol=1e-5)
    ab = float(sch.alphas_cumprod[40])
    assert torch.allclose(x, ab**0.5 * x0 + (1 - ab) ** 0.5 * eps, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip", ["static", "dynamic"])
def test_clipped_x0_and_eps_stay_consistent_with_x_t(prediction, clip):
    sch = VPProcess("linear", 100)
    x = 3 * torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    mf = guided_model_fn(lambda x_t, t, c: 2 * x_t, sch, prediction, {}, None, x0_clip=X0Clip(clip))
    for t in (5, 70):
        x0, eps = mf(x, t)
        assert x0.abs().max() <= 1.0 + 1e-6
        ab = float(sch.alphas_cumprod[t])
        assert torch.allclose(x, ab**0.5 * x0 + (1 - ab) ** 0.5 * eps, atol=1e-5)


class EmbedNet(nn.Module):
    """A denoiser whose x0 output is the mean of the condition vector (so CFG is visible in the sample)."""

    def forward(self, x_t, t, cond=None, context=None, context_mask=None):
        return torch.zeros_like(x_t) + cond.mean(dim=1).view(-1, 1, 1, 1)


def test_per_class_scales_through_the_module():
    from difflab.conditioning.base import ClassConditioner
    from difflab.diffusion.guidance import CFG
    from difflab.diffusion.system import Diffusion
    from difflab.lit_modules.diffusion_module import DiffusionModule

    torch.manual_seed(0)
    cond = ClassConditioner(3, embed_dim=4)
    with torch.no_grad():
        cond.embedding.weight.copy_(0.05 * torch.arange(16.0).view(4, 4))  # small, distinct per class
    diffusion = Diffusion(
        VPProcess("cosine", 50),
        Objective(prediction="x0", x0_clip="none"),
        functools.partial(ddim, steps=1),
        guidance=CFG(scale=2.0, per_class={1: 4.0}),
        conditioner=cond,
        sample_shape=(1, 2, 2),
    )
    module = DiffusionModule(net=lambda cond_dim, context_dim: EmbedNet(), diffusion=diffusion)
    labels = torch.tensor([0, 1, 2, 1])
    assert diffusion.guidance.scales(labels, cond.num_classes).tolist() == [2.0, 4.0, 2.0, 4.0]
    out = diffusion.sample(module, 4, labels, noise=torch.zeros(4, 1, 2, 2))  # one DDIM step to alpha_bar 1: x0_hat
    means = cond.embedding.weight.mean(dim=1)
    null = means[3]
    expected = torch.stack([null + s * (means[k] - null) for k, s in zip(labels.tolist(), [2.0, 4.0, 2.0, 4.0])])
    assert torch.allclose(out[:, 0, 0, 0], expected, atol=1e-5)
