"""The guidance registry (src/diffusion/guidance.py): cfg, cfgpp, apg and autoguidance against their closed forms,
APG against diffusers, CFG++ through a DDIM step, autoguidance's guide checks, every method through the module's
samplers on vp and flow, the configs/guidance group and `sample.py guidance.method=...` on a tiny trained run."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from difflab.diffusion.guidance import CFG, GUIDANCE_METHODS, Autoguidance, guided_model_fn
from difflab.diffusion.objectives import Objective
from difflab.diffusion.processes import FlowProcess, VPProcess
from difflab.diffusion.samplers import SAMPLERS, ddim, sampling_grid
from difflab.diffusion.system import Diffusion
from difflab.utils.errors import ConfigError
from tests.helpers import CONFIG_DIR, compose_train, run_hydra_main

torch.set_num_threads(1)
SHAPE = (3, 1, 4, 4)


def _conds(n):
    return (
        {"vector": torch.ones(n), "context": None, "context_mask": None},
        {"vector": -torch.ones(n), "context": None, "context_mask": None},
    )


def _outputs(t, seed=0):
    """Fixed conditional / unconditional outputs for time t (different at every t, for APG's momentum)."""
    g = torch.Generator().manual_seed(seed + int(1000 * float(t)) % 100_000)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g, dtype=torch.float64)


class TableNet:
    """A 'network' whose output is a hand-built table: cond rows get c(t), null rows u(t), whatever x_t is."""

    def __call__(self, x_in, t_net, cond):
        n = x_in.shape[0] // SHAPE[0]
        c, u = _outputs(t_net[0])
        rows = [c if v > 0 else u for v in cond["vector"][:: SHAPE[0]].tolist()]
        return torch.cat(rows[:n]).to(x_in.dtype)


def _x():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _mf(method, scale, process=None, prediction="x0", **opts):
    process = process or VPProcess("cosine", 100)
    cond, null = _conds(SHAPE[0])
    return guided_model_fn(TableNet(), process, prediction, cond, null, scale=scale, method=method, options=opts)


def _ab(process, t):
    a, s = process.coefficients(torch.tensor([float(t)], dtype=torch.float64))
    return float(a), float(s)


# ------------------------------------------------------------------------------------------- closed forms
def test_registry_and_config_group_agree():
    """Each method's class, its config file, the import-light settings table the pre-flight reads and the schema
    name the same methods and settings."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from difflab.config_checks import group_schemas
    from difflab.registry import GUIDANCE_CLASSES, GUIDANCE_SETTINGS

    own = {name: cls for name, cls in GUIDANCE_METHODS.items() if cls.__module__.startswith("difflab.")}
    assert (
        set(own) == {"cfg", "cfgpp", "apg", "autoguidance", "distilled", "autoguidance_cfg"} == set(GUIDANCE_SETTINGS)
    )
    assert {name: cls.keys() for name, cls in own.items()} == GUIDANCE_SETTINGS
    assert {name: cls.__name__ for name, cls in own.items()} == GUIDANCE_CLASSES
    files = {p.stem for p in (CONFIG_DIR / "guidance").glob("*.yaml")}
    assert set(own) <= files  # one file per method, plus presets of a method (autoguidance_kept)
    rules = {k for k, _ in group_schemas()["guidance"][0]}
    for path in (CONFIG_DIR / "guidance").glob("*.yaml"):
        node = OmegaConf.load(path)
        cls = get_class(node._target_)
        method = path.stem if path.stem in own else path.stem.split("_")[0]
        assert cls is own[method], path
        keys = {k for k in node if not k.startswith("_")}
        assert keys == set(cls.keys()) and keys <= rules, path


def test_cfg_is_u_plus_s_times_c_minus_u():
    x = _x()
    x0, eps = _mf("cfg", 3.0)(x, 40)
    c, u = _outputs(40)
    assert torch.allclose(x0.double(), u + 3.0 * (c - u), atol=1e-6)
    a, s = _ab(VPProcess("cosine", 100), 40)
    assert torch.allclose(x.float(), (a * x0 + s * eps).float(), atol=1e-5)


def test_cfgpp_lambda_x0_and_unconditional_eps():
    """CFG++: x0 from eps_u + lambda (eps_c - eps_u), eps_hat = eps_u (eps prediction: outputs are eps)."""
    sch = VPProcess("cosine", 100)
    x = _x()
    x0, eps = _mf("cfgpp", 0.4, sch, prediction="eps")(x, 40)
    c, u = _outputs(40)
    a, s = _ab(sch, 40)
    eps_lam = u + 0.4 * (c - u)
    assert torch.allclose(x0.double(), (x - s * eps_lam) / a, atol=1e-5)
    assert torch.allclose(eps.double(), u, atol=1e-6), "CFG++ re-noises with the unconditional eps"
    # lambda = 1 still needs the unconditional pass (eps_u), unlike CFG's scale 1
    x0, eps = _mf("cfgpp", 1.0, sch, prediction="eps")(x, 40)
    assert torch.allclose(eps.double(), u, atol=1e-6) and torch.allclose(x0.double(), (x - s * c) / a, atol=1e-5)


def test_cfgpp_ddim_step_matches_the_paper_update():
    """CFG++ DDIM (Chung et al. 2024, Algorithm 1): x' = sqrt(ab') x0_lambda + sqrt(1 - ab') eps_u, computed by hand
    on a 2-step grid from t = 70 (eps prediction on vp)."""
    sch = VPProcess("linear", 100)
    x = _x().float()
    lam = 0.6
    out = ddim(_mf("cfgpp", lam, sch, prediction="eps"), x, sch, steps=3, start=70)
    expected = x.double()
    grid = sampling_grid(sch, 3, start=70)
    assert grid[0][0] == 70 and len(grid) >= 3
    for (t, _, _), (t_next, _, _) in zip(grid, grid[1:]):
        ab = float(sch.alphas_cumprod[int(t)])
        ab_next = 1.0 if t_next < 0 else float(sch.alphas_cumprod[int(t_next)])
        c, u = _outputs(float(t))
        x0 = (expected - (1 - ab) ** 0.5 * (u + lam * (c - u))) / ab**0.5
        expected = ab_next**0.5 * x0 + (1 - ab_next) ** 0.5 * u
    assert torch.allclose(out.double(), expected, atol=1e-4)
    # the same grid with CFG at scale lambda re-noises with eps_lambda instead: a different result
    assert not torch.allclose(
        ddim(_mf("cfg", lam, sch, prediction="eps"), x, sch, steps=3, start=70).double(), expected, atol=1e-3
    )
    # Euler takes the model function's eps (no longer rebuilt from x0), so it is CFG++'s DDIM update as well
    from difflab.diffusion.samplers import euler

    out_euler = euler(_mf("cfgpp", lam, sch, prediction="eps"), x, sch, steps=3, start=70)
    assert torch.allclose(out_euler.double(), expected, atol=1e-4)


def _apg_closed_form(c, u, s, eta, r, running=None, beta=0.0):
    diff = c - u
    if running is not None:
        diff = diff + beta * running
    if r > 0:
        n = diff.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        diff = diff * torch.clamp(r / n, max=1.0)
    unit = c / c.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    par = (diff * unit).sum(dim=(1, 2, 3), keepdim=True) * unit
    return c + (s - 1) * ((diff - par) + eta * par), diff


def test_apg_closed_form_and_consistent_eps():
    sch = VPProcess("cosine", 100)
    x = _x()
    x0, eps = _mf("apg", 4.0, sch, eta=0.3, norm_threshold=2.0)(x, 40)
    c, u = _outputs(40)
    want, _ = _apg_closed_form(c, u, 4.0, 0.3, 2.0)
    assert torch.allclose(x0.double(), want, atol=1e-5)
    a, s = _ab(sch, 40)
    assert torch.allclose(x.float(), (a * x0 + s * eps).float(), atol=1e-5)
    # eta = 1, no clipping: APG is CFG
    x0_cfg, _ = _mf("cfg", 4.0, sch)(x, 40)
    assert torch.allclose(_mf("apg", 4.0, sch, eta=1.0)(x, 40)[0], x0_cfg, atol=1e-5)


def test_apg_matches_diffusers_normalized_guidance_with_momentum():
    """Same inputs -> same output (1e-6) as diffusers' normalized_guidance over several steps of one sampling call
    (momentum running average, norm clipping, eta), in the paper's formulation x0_c + (s - 1) update."""
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    sch = VPProcess("cosine", 100)
    x = _x()
    s, eta, r, beta = 3.5, 0.2, 1.5, -0.5
    mf = _mf("apg", s, sch, eta=eta, norm_threshold=r, momentum=beta)
    buffer = MomentumBuffer(beta)
    for t in (90, 60, 30, 10):
        x0, _ = mf(x, t)
        c, u = _outputs(t)
        ref = normalized_guidance(c, u, s - 1, buffer, eta, r, use_original_formulation=True)
        assert torch.allclose(x0.double(), ref, atol=1e-6), t
    # a new model_fn (a new sampling call) starts without momentum
    x0, _ = _mf("apg", s, sch, eta=eta, norm_threshold=r, momentum=beta)(x, 10)
    c, u = _outputs(10)
    ref = normalized_guidance(c, u, s - 1, MomentumBuffer(beta), eta, r, use_original_formulation=True)
    assert torch.allclose(x0.double(), ref, atol=1e-6)


def test_autoguidance_closed_form_and_guide_equal_to_main_is_conditional():
    sch = VPProcess("cosine", 100)
    x = _x()
    cond, _ = _conds(SHAPE[0])
    net = TableNet()
    weak = lambda x_in, t_net: 0.5 * net(x_in, t_net, cond)  # noqa: E731
    x0, _ = guided_model_fn(net, sch, "x0", cond, None, scale=2.5, method="autoguidance", guide=weak)(x, 40)
    c, _ = _outputs(40)
    assert torch.allclose(x0.double(), 0.5 * c + 2.5 * (c - 0.5 * c), atol=1e-6)
    same = lambda x_in, t_net: net(x_in, t_net, cond)  # noqa: E731
    plain = guided_model_fn(net, sch, "x0", cond, None, scale=1.0)(x, 40)
    for w in (0.0, 1.0, 3.0, 7.5):
        got = guided_model_fn(net, sch, "x0", cond, None, scale=w, method="autoguidance", guide=same)(x, 40)
        assert torch.allclose(got[0], plain[0], atol=1e-6) and torch.allclose(got[1], plain[1], atol=1e-5)


def test_interval_gives_the_plain_conditional_outside():
    sch = VPProcess("cosine", 100)
    lo, hi = float(sch.sigmas[20]), float(sch.sigmas[60])
    x = _x()
    cond, _ = _conds(SHAPE[0])
    plain = guided_model_fn(TableNet(), sch, "x0", cond, None)(x, 80)
    for method in ("cfg", "cfgpp", "apg"):
        scale = 0.5 if method == "cfgpp" else 3.0
        out = guided_model_fn(
            TableNet(), sch, "x0", cond, _conds(SHAPE[0])[1], scale=scale, interval=[lo, hi], method=method
        )
        assert torch.equal(out(x, 80)[0], plain[0]), method
        assert not torch.allclose(out(x, 40)[0], plain[0]), method


def test_bad_settings_fail_in_one_line():
    with pytest.raises(ValueError, match=r"a number in \[0, 1\] with guidance.method=cfgpp"):
        _mf("cfgpp", 2.0)
    with pytest.raises(ValueError, match="unknown"):
        _mf("pag", 2.0)
    cond, null = _conds(3)
    with pytest.raises(ValueError, match="needs a guide network"):
        guided_model_fn(TableNet(), VPProcess("cosine", 100), "x0", cond, null, scale=2.0, method="autoguidance")


# ------------------------------------------------------------------------------------------- the module
class TinyNet(nn.Module):
    """A few parameters that see x, the time and the condition vector (enough for guidance to matter)."""

    def __init__(self, cond_dim, context_dim=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.cond = nn.Linear(cond_dim, 1)

    def forward(self, x, t, cond=None, context=None, context_mask=None):
        return self.conv(x) * torch.cos(t / 1000).view(-1, 1, 1, 1) + self.cond(cond).view(-1, 1, 1, 1)


def _module(process_name="vp", guidance=None, seed=0):
    from difflab.conditioning.base import ClassConditioner
    from difflab.lit_modules.diffusion_module import DiffusionModule

    torch.manual_seed(seed)
    process = VPProcess("cosine", 50) if process_name == "vp" else FlowProcess()
    prediction = "v" if process_name == "vp" else "flow"
    diffusion = Diffusion(
        process,
        Objective(prediction=prediction, x0_clip="none"),
        functools.partial(ddim, steps=3),
        guidance=CFG(scale=2.0).updated(guidance),
        conditioner=ClassConditioner(3, embed_dim=4),
        sample_shape=(1, 4, 4),
    )
    return DiffusionModule(net=functools.partial(TinyNet, seed=seed), diffusion=diffusion)


METHOD_SETTINGS = {
    "cfg": {"scale": 3.0},
    "cfgpp": {"scale": 0.6},
    "apg": {"scale": 3.0, "momentum": -0.5, "norm_threshold": 1.0},
    "autoguidance": {"scale": 2.0, "guide_ckpt": "in-memory"},
    "autoguidance_cfg": {"scale": 2.0, "guide_ckpt": "in-memory", "cfg_scale": 2.0},
}


@pytest.mark.parametrize("process_name", ["vp", "flow"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp_2m"])
def test_every_method_samples_with_every_sampler(process_name, sampler, monkeypatch):
    module = _module(process_name)
    guide = _module(process_name, seed=1)
    monkeypatch.setattr(Autoguidance, "guide_model", lambda self, main: guide)
    labels = torch.tensor([0, 1, 2, 0])
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    fn = functools.partial(SAMPLERS[sampler], steps=3)
    plain = module.diffusion.sample(module, 4, labels, sampler=fn, guidance_scale=1.0, noise=noise)
    for method, settings in METHOD_SETTINGS.items():
        out = module.diffusion.sample(
            module, 4, labels, sampler=fn, noise=noise, guidance={"method": method, **settings}
        )
        assert out.shape == (4, 1, 4, 4) and torch.isfinite(out).all(), method
        assert not torch.allclose(out, plain, atol=1e-6), (method, "guidance changed nothing")


def test_stored_guidance_dicts_migrate_to_their_classes():
    """Checkpoints of before the guidance objects store a dict (no method: saved before the registry, so cfg)."""
    from difflab.checkpoints import migrate_config

    def migrated(guidance):
        config = {"model": {"_target_": "difflab.lit_modules.diffusion_module.DiffusionModule", "guidance": guidance}}
        return migrate_config(config)["model"]["diffusion"]["guidance"]

    shared = {"scale": 2.5, "rescale": 0.0, "interval": None, "per_class": None}
    assert migrated(shared) == {"_target_": "difflab.diffusion.guidance.CFG", **shared}
    apg = migrated({**shared, "method": "apg", "eta": 0.5, "norm_threshold": 0.0, "momentum": -0.5})
    assert apg == {
        "_target_": "difflab.diffusion.guidance.APG",
        "scale": 2.5,
        "interval": None,
        "per_class": None,
        "eta": 0.5,
        "norm_threshold": 0.0,
        "momentum": -0.5,
    }  # rescale was never apg's
    old, new = _module(guidance=shared), _module(guidance={"method": "cfg", **shared})
    labels, noise = torch.tensor([0, 1, 2]), torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        old.diffusion.sample(old, 3, labels, noise=noise), new.diffusion.sample(new, 3, labels, noise=noise)
    )


def test_module_refuses_bad_guidance_in_one_line():
    with pytest.raises(
        ConfigError, match=r"^guidance.scale=2.0 is invalid: a number in \[0, 1\] with guidance.method=cfgpp"
    ) as err:
        _module(guidance={"method": "cfgpp", "scale": 2.0})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="needs guidance.guide_ckpt"):
        _module(guidance={"method": "autoguidance", "scale": 2.0})
    module = _module()
    with pytest.raises(ConfigError, match="needs guidance.guide_ckpt"):
        module.diffusion.sample(module, 3, torch.tensor([0, 1, 2]), guidance={"method": "autoguidance"})


def test_mismatched_guide_refused_in_one_line():
    check_guide = _module("vp").diffusion.check_guide
    check_guide(_module("vp", seed=1), "g.ckpt")  # same setup, other weights: fine
    with pytest.raises(
        ConfigError,
        match=r"^guidance.guide_ckpt=g.ckpt cannot guide this model: different process "
        r"\(guide flow, main vp\)$",
    ):
        check_guide(_module("flow"), "g.ckpt")
    other = _module("vp")
    other.diffusion.sample_shape = (1, 8, 8)
    with pytest.raises(ConfigError, match=r"different sample shape \(guide \(1, 8, 8\), main \(1, 4, 4\)\)$"):
        check_guide(other, "g.ckpt")
    other = _module("vp")
    other.diffusion.objective = Objective(prediction="eps", x0_clip="none")
    with pytest.raises(ConfigError, match=r"different prediction \(guide eps, main v\)$"):
        check_guide(other, "g.ckpt")
    with pytest.raises(ConfigError, match=r"^guidance.guide_ckpt=g.ckpt is not a diffusion model checkpoint$"):
        check_guide(nn.Linear(1, 1), "g.ckpt")


def test_guide_compatibility_ignores_the_sampling_grid_and_training_density():
    """A guide combines when its denoiser saw the same inputs at every noise level: another flow shift or sampling
    grid is fine (same path t -> (1 - t, t), same time input), another beta table or time input is not."""
    main = _module("flow").diffusion
    other = _module("flow")
    other.diffusion.process = FlowProcess(shift=3.0, sampling_shift=0.33, density="uniform")
    main.check_guide(other, "g.ckpt")
    other.diffusion.process = FlowProcess(time_scale=1.0)
    with pytest.raises(
        ConfigError,
        match=r"different time input at the same noise level \(guide 0.9933, main 993.3\): give both the same "
        r"process.time_scale$",
    ):
        main.check_guide(other, "g.ckpt")
    vp = _module("vp").diffusion
    spaced = _module("vp")
    spaced.diffusion.process = VPProcess("cosine", 50, spacing="leading")
    vp.check_guide(spaced, "g.ckpt")
    spaced.diffusion.process = VPProcess("linear", 50)
    with pytest.raises(ConfigError, match=r"different noise schedule \(both vp, other coefficients\)$"):
        vp.check_guide(spaced, "g.ckpt")


# ------------------------------------------------------------------------------------------- configs
def _problems(tmp_path, overrides):
    from difflab.config_checks import check_config

    return check_config(compose_train(tmp_path, overrides), "train")


def test_guidance_group_composes_into_the_diffusion_object(tmp_path):
    cfg = compose_train(tmp_path, ["guidance=apg", "guidance.scale=4"])
    g = cfg.model.diffusion.guidance
    assert g._target_.endswith(".APG") and g.scale == 4 and g.eta == 0.0 and "rescale" not in g
    assert compose_train(tmp_path, []).model.diffusion.guidance._target_.endswith(".CFG")  # the default
    assert "diffusion" not in compose_train(tmp_path, ["experiment=digits_vae"]).model  # the autoencoder has none
    assert _problems(tmp_path, ["guidance=apg", "guidance.scale=4"]) == []
    assert _problems(tmp_path, ["guidance=cfgpp", "guidance.scale=0.6"]) == []
    assert _problems(tmp_path, ["guidance=cfgpp"]) == []  # its own default lambda, 0.6
    assert _problems(tmp_path, ["guidance=cfgpp", "guidance.scale=2"])[0].startswith("guidance.scale=2")
    # the rules a method's constructor states reach the pre-flight by building it (config_checks.constructor_problems)
    assert _problems(tmp_path, ["guidance=autoguidance"]) == [
        "guidance.method=autoguidance needs guidance.guide_ckpt (a weaker checkpoint of the same setup: an earlier "
        "step, a shorter EMA or a smaller model; or `kept`: this run's own early weights)"
    ]
    assert _problems(tmp_path, ["guidance=apg", "guidance.momentum=1.5"])[0].startswith(
        "guidance.momentum=1.5 is invalid"
    )
    assert _problems(tmp_path, ["guidance=apg", "+guidance.rescale=0.5"])[0].startswith(
        "guidance.rescale=0.5 is invalid: not an argument of APG"
    )


# ------------------------------------------------------------------------------------------- sample.py
# run_dir: the tiny digits training run of tests/conftest.py


def _sample_cli(run_dir, tmp_path, name, extra):
    import sample

    args = [
        f"ckpt_path={run_dir / 'checkpoints' / 'step_0000004.ckpt'}",
        "n=10",
        "batch_size=10",
        "device=cpu",
        "sampler=ddim",
        "sampler.steps=2",
        f"out_dir={tmp_path / name}",
        f"hydra.run.dir={tmp_path / ('h' + name)}",
    ]
    code = run_hydra_main(sample.main, [*args, *extra])
    return code, (np.load(tmp_path / name / "samples.npz")["images"] if code == 0 else None)


def test_sample_cli_selects_the_method(run_dir, tmp_path, monkeypatch):
    """guidance.method reaches the model function with its keys (the tiny 4-step model's guidance is too weak to
    tell the methods apart in uint8 images, so the calls are recorded)."""
    from difflab.diffusion import guidance

    calls = []
    for name, cls in list(guidance.GUIDANCE_METHODS.items()):

        def recording(step, scale, _fn=cls.combine, _name=name, **opts):
            calls.append((_name, float(scale), opts))
            return _fn(step, scale, **opts)

        monkeypatch.setattr(cls, "combine", staticmethod(recording))
    code, images = _sample_cli(
        run_dir,
        tmp_path,
        "apg",
        ["guidance.method=apg", "guidance.scale=3", "guidance.eta=0.5", "guidance.momentum=-0.5"],
    )
    assert code == 0 and images.shape == (10, 1, 8, 8)
    assert calls and {c[0] for c in calls} == {"apg"} and calls[0][1] == 3.0
    assert calls[0][2] == {"eta": 0.5, "momentum": -0.5, "norm_threshold": 0.0}  # unset: APG's default
    calls.clear()
    assert _sample_cli(run_dir, tmp_path, "cfgpp", ["guidance.method=cfgpp", "guidance.scale=0.6"])[0] == 0
    assert {c[0] for c in calls} == {"cfgpp"} and calls[0][1] == 0.6
    assert _sample_cli(run_dir, tmp_path, "bad", ["guidance.method=cfgpp", "guidance.scale=3"])[0] == 2


def test_sample_cli_autoguidance_with_itself_is_conditional(run_dir, tmp_path):
    main = run_dir / "checkpoints" / "step_0000004.ckpt"
    code, plain = _sample_cli(run_dir, tmp_path, "plain", ["guidance.scale=1"])
    assert code == 0
    code, same = _sample_cli(
        run_dir,
        tmp_path,
        "auto_same",
        ["guidance.method=autoguidance", "guidance.scale=3", f"guidance.guide_ckpt={main}"],
    )
    assert code == 0 and np.abs(same.astype(int) - plain.astype(int)).max() <= 1  # uint8 rounding
    earlier = run_dir / "checkpoints" / "step_0000002.ckpt"
    code, auto = _sample_cli(
        run_dir,
        tmp_path,
        "auto",
        ["guidance.method=autoguidance", "guidance.scale=3", f"guidance.guide_ckpt={earlier}"],
    )
    assert code == 0 and not np.array_equal(auto, plain)
    assert _sample_cli(run_dir, tmp_path, "noguide", ["guidance.method=autoguidance", "guidance.scale=3"])[0] == 2
