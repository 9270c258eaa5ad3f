"""UNet2D: shapes, conditioning paths, cross-attention wiring, and the module's refusal of unconsumed conditioning."""

import functools

import pytest
import torch

from difflab.conditioning.base import ClassConditioner, Conditioner, NoConditioner, cond_dict
from difflab.diffusion.objectives import Objective
from difflab.diffusion.processes import VPProcess
from difflab.diffusion.samplers import ddim
from difflab.diffusion.system import Diffusion
from difflab.lit_modules.diffusion_module import DiffusionModule
from difflab.models.unet2d import UNet2D
from difflab.utils.errors import ConfigError

torch.set_num_threads(1)


def tiny(**kw):
    base = dict(
        in_channels=1,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        groups=4,
        head_dim=8,
    )
    base.update(kw)
    return UNet2D(**base)


def test_output_shape_and_zero_init():
    net = tiny(cond_dim=6)
    x = torch.randn(3, 1, 16, 16)
    out = net(x, torch.tensor([0.0, 10.5, 999.0]), torch.randn(3, 6))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv: the untrained net predicts 0


def test_condition_vector_changes_output_after_training_step():
    torch.manual_seed(0)
    net = tiny(cond_dim=4)
    for p in net.parameters():  # undo the zero-initialisation of residual branches and the output conv
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 5.0])
    a = net(x, t, torch.zeros(2, 4))
    b = net(x, t, torch.ones(2, 4))
    assert not torch.allclose(a, b)


def test_cross_attention_count_and_context_required():
    net = tiny(context_dim=12, cross_attention_levels=(0, 1))
    assert net.count_cross_attention() == 7  # per level 1 down + 2 up blocks, plus the middle block
    x = torch.randn(2, 1, 8, 8)
    out = net(x, torch.zeros(2), None, torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool))
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="context"):
        net(x, torch.zeros(2))


def test_bad_attention_level_is_rejected():
    with pytest.raises(ValueError, match="attention_levels"):
        tiny(attention_levels=(3,))


class _ContextOnly(Conditioner):
    batch_key = "text"
    vector_dim = 0
    context_dim = 12

    def null_like(self, raw):
        return [""] * len(raw)

    def forward(self, raw):
        return cond_dict(context=torch.zeros(len(raw), 3, 12))


def _module(conditioner, **net_kw):
    net = functools.partial(tiny, **net_kw)
    return DiffusionModule(
        net=net,
        diffusion=Diffusion(
            VPProcess("cosine", 100),
            Objective("v"),
            functools.partial(ddim, steps=3),
            conditioner=conditioner,
            sample_shape=(1, 8, 8),
        ),
    )


def test_module_derives_widths_from_conditioner():
    m = _module(ClassConditioner(10, embed_dim=16))
    assert m.denoiser.embed.cond_proj.in_features == 16
    m2 = _module(_ContextOnly(), cross_attention_levels=(1,))
    assert m2.num_cross_attention == 4  # level 1: 1 down + 2 up, plus the middle block


def test_module_refuses_context_without_cross_attention():
    # The research log's incident: a network built without a context path while text conditioning is configured.
    built_without_context = tiny()
    with pytest.raises(ConfigError, match="cross-attention"):
        DiffusionModule(
            net=built_without_context,
            diffusion=Diffusion(
                VPProcess("cosine", 100),
                Objective("v"),
                functools.partial(ddim, steps=3),
                conditioner=_ContextOnly(),
                sample_shape=(1, 8, 8),
            ),
        )


def test_module_sample_shape_and_range():
    m = _module(NoConditioner())
    x = m.diffusion.sample(m, 3)
    assert x.shape == (3, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
