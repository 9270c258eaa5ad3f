"""Autoguidance plus CFG in its own band (guidance.method=autoguidance_cfg, difflab.diffusion.guidance.AutoguidanceCFG):
D = D_c + (w - 1) (D_c - D_guide) in `interval` + (s - 1) (D_c - D_uncond) in `cfg_interval`, with only the passes a
step needs; each term alone is autoguidance or CFG; before the kept guide exists it samples as CFG in its band; the
settings are checked; a tiny run keeps its guide and `sample.py` uses it with no argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab.checkpoints import KEPT_GUIDE_KEY, load_checkpoint
from difflab.diffusion.guidance import CFG, AutoguidanceCFG, guided_model_fn
from difflab.diffusion.processes import VPProcess
from difflab.utils.errors import ConfigError
from tests.helpers import run_hydra_main, tiny_overrides
from tests.test_guidance_methods import SHAPE, TableNet, _conds, _module, _outputs, _problems, _x

torch.set_num_threads(1)
LABELS = torch.tensor([0, 1, 2, 0])
PROCESS = VPProcess("cosine", 100)


class Counted:
    """Wrap a network or guide, counting the samples it is evaluated on."""

    def __init__(self, fn):
        self.fn, self.rows = fn, 0

    def __call__(self, x_in, *args):
        self.rows += x_in.shape[0]
        return self.fn(x_in, *args)


def _fn(scale, cfg_scale, interval=None, cfg_interval=None):
    """The guided model function with a TableNet main model and a guide whose output is 0.5 c(t)."""
    cond, null = _conds(SHAPE[0])
    net = Counted(TableNet())
    guide = Counted(lambda x_in, t_net: 0.5 * TableNet()(x_in, t_net, cond))
    fn = guided_model_fn(
        net,
        PROCESS,
        "x0",
        cond,
        null,
        scale=scale,
        method="autoguidance_cfg",
        options={"cfg_scale": cfg_scale, "cfg_interval": cfg_interval},
        interval=interval,
        guide=guide,
    )
    return fn, net, guide


def _sigma_ve(t):
    a, s = PROCESS.coefficients(torch.tensor([float(t)], dtype=torch.float64))
    return float(s / a)


def test_both_terms_add_on_the_raw_output_with_only_the_passes_each_band_needs():
    x = _x()
    mid = _sigma_ve(50)
    # the guide's band: (mid, inf); CFG's band: (0, mid]
    fn, net, guide = _fn(2.5, 1.75, interval=[mid, None], cfg_interval=[0.0, mid])
    for t, ag, cf in ((80, True, False), (20, False, True), (50, False, True)):
        c, u = _outputs(t)
        want = c + (ag * 1.5) * (c - 0.5 * c) + (cf * 0.75) * (c - u)
        net.rows = guide.rows = 0
        x0, _ = fn(x, t)
        assert torch.allclose(x0.double(), want, atol=1e-6), t
        assert (net.rows, guide.rows) == (SHAPE[0] * (1 + cf), SHAPE[0] * ag), t
    # both bands everywhere: three evaluations, the unconditional one batched with the conditional
    fn, net, guide = _fn(2.5, 1.75)
    c, u = _outputs(40)
    x0, _ = fn(x, 40)
    assert torch.allclose(x0.double(), c + 1.5 * (c - 0.5 * c) + 0.75 * (c - u), atol=1e-6)
    assert (net.rows, guide.rows) == (2 * SHAPE[0], SHAPE[0])


def test_each_term_alone_is_autoguidance_or_cfg():
    x = _x()
    cond, null = _conds(SHAPE[0])
    net = TableNet()
    weak = lambda x_in, t_net: 0.5 * net(x_in, t_net, cond)  # noqa: E731
    fn, counted, _ = _fn(2.5, 1.0)
    ag_only = fn(x, 40)
    assert counted.rows == SHAPE[0]  # CFG's scale 1: no unconditional pass
    want = guided_model_fn(net, PROCESS, "x0", cond, None, scale=2.5, method="autoguidance", guide=weak)(x, 40)
    assert torch.allclose(ag_only[0], want[0], atol=1e-9) and torch.allclose(ag_only[1], want[1], atol=1e-9)
    fn, _, guide = _fn(1.0, 3.0, cfg_interval=[0.1, 2.0])
    want_fn = guided_model_fn(net, PROCESS, "x0", cond, null, scale=3.0, interval=[0.1, 2.0])
    for t in (10, 40, 90):
        assert torch.allclose(fn(x, t)[0], want_fn(x, t)[0], atol=1e-9), t
    assert guide.rows == 0  # autoguidance scale 1: the guide is never evaluated


def test_before_the_guide_is_kept_it_samples_as_cfg_in_its_band():
    settings = {"guide_ckpt": "kept", "scale": 2.5, "interval": [0.3, 5.4], "cfg_scale": 2.0, "cfg_interval": [0.1, 2]}
    module = _module("flow", guidance={"method": "autoguidance_cfg", **settings})
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    got = module.diffusion.sample(module, 4, LABELS, noise=noise)
    want = module.diffusion.sample(module, 4, LABELS, noise=noise, guidance=CFG(scale=2.0, interval=[0.1, 2]))
    assert torch.equal(got, want)
    module.diffusion.guidance.keep(_module("flow", seed=1).state_dict(), step=5, like=module)
    guided = module.diffusion.sample(module, 4, LABELS, noise=noise)
    assert (guided - want).abs().max() > 1e-4  # the guide now acts


def test_the_guide_is_w_for_a_per_call_scale_and_reconstruction_at_1_is_plain_conditional():
    """A per-call scale sets the guide's w (1: CFG in its band alone); the reconstruction diagnostic's scale 1 stays
    the plain conditional model for this guidance too."""
    from difflab.diagnostics.reconstruction import reconstruct

    settings = {"guide_ckpt": "kept", "scale": 2.5, "interval": None, "cfg_scale": 3.0, "cfg_interval": None}
    module = _module("flow", guidance={"method": "autoguidance_cfg", **settings})
    module.diffusion.guidance.keep(_module("flow", seed=1).state_dict(), step=5, like=module)
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    at_1 = module.diffusion.sample(module, 4, LABELS, noise=noise, guidance_scale=1.0)
    cfg_only = module.diffusion.sample(module, 4, LABELS, noise=noise, guidance=CFG(scale=3.0))
    assert torch.allclose(at_1, cfg_only, atol=1e-6)
    x0 = torch.zeros(4, 1, 4, 4)
    _, recs, _ = reconstruct(module, x0, LABELS, [0.5], noise, steps=4, guidance_scale=1.0)
    module.diffusion.guidance = CFG(scale=1.0)
    _, plain, _ = reconstruct(module, x0, LABELS, [0.5], noise, steps=4, guidance_scale=1.0)
    assert torch.equal(recs, plain)


@pytest.mark.parametrize(
    "settings, key",
    [({"cfg_scale": -1.0}, "guidance.cfg_scale=-1.0"), ({"cfg_interval": [2.0, 0.5]}, "guidance.cfg_interval")],
)
def test_bad_cfg_settings_are_refused_in_one_line(settings, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        AutoguidanceCFG(scale=2.0, guide_ckpt="kept", **settings)
    assert "\n" not in str(err.value)


def test_the_config_group_file_composes_and_the_preflight_checks_it(tmp_path):
    from tests.helpers import compose_train

    g = compose_train(tmp_path, ["guidance=autoguidance_cfg"]).model.diffusion.guidance
    assert g._target_.endswith(".AutoguidanceCFG") and g.guide_ckpt == "kept"
    assert _problems(tmp_path, ["guidance=autoguidance_cfg"]) == []
    assert _problems(tmp_path, ["guidance=autoguidance_cfg", "guidance.cfg_scale=-2"])[0].startswith(
        "guidance.cfg_scale=-2"
    )
    assert _problems(tmp_path, ["guidance=autoguidance_cfg", "guidance.cfg_interval=[3,1]"])[0].startswith(
        "guidance.cfg_interval"
    )


@pytest.fixture(scope="module")
def combo_run(tmp_path_factory):
    """A tiny run with guidance=autoguidance_cfg: 4 steps, the guide kept at half the budget (step 2); w = 4 so the
    guide's term shows in 8-bit samples of a 4-step model (its class embedding has barely moved: CFG's term does not)."""
    import train

    out = tmp_path_factory.mktemp("combo_run")
    extra = ["guidance=autoguidance_cfg", "guidance.keep_at=0.5", "guidance.interval=null", "guidance.scale=4"]
    extra += ["guidance.cfg_interval=null", "logger=csv", f"hydra.run.dir={out}"]
    assert run_hydra_main(train.main, [*tiny_overrides(max_steps=4, save_every=2), *extra]) == 0
    return out


def test_a_run_keeps_its_guide_and_sample_py_guides_with_it_and_takes_both_scales(combo_run, tmp_path):
    import sample

    last = combo_run / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)[KEPT_GUIDE_KEY]["step"] == 2

    def draw(name, extra=()):
        out = tmp_path / name
        args = [f"ckpt_path={last}", "n=10", "batch_size=10", "device=cpu", f"out_dir={out}", f"hydra.run.dir={out}_h"]
        assert run_hydra_main(sample.main, [*args, *extra]) == 0
        log = (tmp_path / f"{name}_h" / "sample.log").read_text()
        assert "no guide kept yet" not in log  # the kept guide travelled with the checkpoint
        return np.load(out / "samples.npz")["images"].astype(int), log

    both, log = draw("both")
    assert "AutoguidanceCFG(scale=4" in log and "cfg_scale=2.0" in log
    no_guide, _ = draw("cfg_term_only", ["guidance.scale=1"])
    assert np.abs(both - no_guide).max() > 0  # the guide's term acts
    _, log = draw("guide_term_only", ["guidance.cfg_scale=1"])
    assert "AutoguidanceCFG(scale=4" in log and "cfg_scale=1.0" in log
