"""Autoguidance with the run's own early weights (guidance=autoguidance_kept, difflab.callbacks.keep_guide): the
guide is kept at keep_at of the budget, travels in checkpoints and exports, samples as D_g + w (D - D_g), and falls
back to CFG until it exists; the pre-flight refuses a kept guide without the callback that keeps it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab.checkpoints import KEPT_GUIDE_KEY, load_checkpoint
from difflab.diffusion.guidance import CFG, Autoguidance, guided_model_fn
from difflab.diffusion.system import load_for_sampling
from difflab.utils.errors import ConfigError
from tests.helpers import run_hydra_main, tiny_overrides
from tests.test_guidance_methods import _module

torch.set_num_threads(1)
LABELS = torch.tensor([0, 1, 2, 0])


def _noise():
    return torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3))


def _kept_module(scale=2.5):
    module = _module("flow", guidance={"method": "autoguidance", "guide_ckpt": "kept", "scale": scale})
    assert isinstance(module.diffusion.guidance, Autoguidance) and module.diffusion.guidance.uses_kept_guide
    return module


def test_before_the_guide_is_kept_it_samples_as_cfg_at_the_same_scale():
    module = _kept_module()
    got = module.diffusion.sample(module, 4, LABELS, noise=_noise())
    want = module.diffusion.sample(module, 4, LABELS, noise=_noise(), guidance=CFG(scale=2.5))
    assert torch.equal(got, want)


def test_kept_guide_is_guide_plus_w_times_main_minus_guide():
    module = _kept_module()
    weaker = _module("flow", seed=1)  # other weights, same architecture
    module.diffusion.guidance.keep(weaker.state_dict(), step=7, like=module)
    assert module.diffusion.guidance.kept_step == 7
    got = module.diffusion.sample(module, 4, LABELS, noise=_noise())
    # the same sampling, with the guide given explicitly to the guided model function
    d = module.diffusion
    cond = d.condition(LABELS)
    gcond = weaker.diffusion.condition(LABELS)
    fn = guided_model_fn(
        lambda x, t, c: module(x, t, c["vector"], c["context"], c["context_mask"]),
        d.process,
        "flow",
        cond,
        scale=2.5,
        x0_clip="none",
        method="autoguidance",
        guide=lambda x, t: weaker(x, t, gcond["vector"], gcond["context"], gcond["context_mask"]),
    )
    want = d.sampler(fn, _noise() * d.process.prior_std, d.process).clamp(-1, 1)
    assert torch.allclose(got, want, atol=1e-6)
    cfg = d.sample(module, 4, LABELS, noise=_noise(), guidance=CFG(scale=2.5))
    assert (got - cfg).abs().max() > 1e-3  # the guide is not the null condition


def test_the_kept_guide_is_frozen_and_shared_by_copies_and_overrides():
    import copy

    module = _kept_module()
    ema_copy = copy.deepcopy(module)  # what the EMA callback holds
    module.diffusion.guidance.keep(_module("flow", seed=1).state_dict(), step=3, like=module)
    assert ema_copy.diffusion.guidance.kept_step == 3
    overridden = module.diffusion.guidance.updated({"scale": 4.0})
    assert overridden.kept_step == 3 and overridden.scale == 4.0
    guide = module.diffusion.guidance.guide_model(module.diffusion)
    assert not any(p.requires_grad for p in guide.parameters())
    assert not any(p.requires_grad is False for p in module.parameters())  # the model itself still trains
    assert module.diffusion.guidance.kept_state()["step"] == 3


@pytest.mark.parametrize("keep_at", [0.0, 1.0, -0.2])
def test_keep_at_outside_the_budget_is_refused(keep_at):
    with pytest.raises(ConfigError, match="guidance.keep_at"):
        Autoguidance(scale=2.0, guide_ckpt="kept", keep_at=keep_at)


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    """A tiny run with guidance=autoguidance_kept: 6 steps, the guide kept at half the budget (step 3)."""
    import train

    out = tmp_path_factory.mktemp("kept_run")
    extra = ["guidance=autoguidance_kept", "guidance.keep_at=0.5", "guidance.interval=null", "logger=csv"]
    extra.append(f"hydra.run.dir={out}")
    assert run_hydra_main(train.main, [*tiny_overrides(max_steps=6, save_every=2), *extra]) == 0
    return out


def test_training_keeps_the_guide_in_every_later_checkpoint(kept_run):
    ckpts = kept_run / "checkpoints"
    assert KEPT_GUIDE_KEY not in load_checkpoint(ckpts / "step_0000002.ckpt")  # before keep_at
    state = load_checkpoint(ckpts / "last.ckpt")[KEPT_GUIDE_KEY]
    assert state["step"] == 3
    later = load_checkpoint(ckpts / "step_0000004.ckpt")[KEPT_GUIDE_KEY]
    assert later["step"] == 3 and all(torch.equal(v, state["state_dict"][k]) for k, v in later["state_dict"].items())
    diffusion, _ = load_for_sampling(ckpts / "last.ckpt")
    assert diffusion.guidance.kept_step == 3
    # the kept weights are the EMA weights of step 3: not those of the last step
    last = load_checkpoint(ckpts / "last.ckpt")["state_dict"]
    assert any(not torch.equal(v, last[k]) for k, v in state["state_dict"].items() if torch.is_floating_point(v))


def _sample(path, out, extra=()):
    import sample

    args = [f"ckpt_path={path}", "n=10", "batch_size=10", "device=cpu", f"out_dir={out}", f"hydra.run.dir={out}_h"]
    code = run_hydra_main(sample.main, [*args, *extra])
    return code, (np.load(out / "samples.npz")["images"] if code == 0 else None)


def test_sample_and_export_use_the_kept_guide_with_no_argument(kept_run, tmp_path):
    from difflab.ops.export import export_checkpoint

    last = kept_run / "checkpoints" / "last.ckpt"
    code, kept = _sample(last, tmp_path / "kept")
    assert code == 0
    code, cfg = _sample(last, tmp_path / "cfg", ["guidance.method=cfg"])
    assert code == 0 and np.abs(kept.astype(int) - cfg.astype(int)).max() > 0
    export_checkpoint(last, tmp_path / "export")
    diffusion, _ = load_for_sampling(tmp_path / "export")
    assert diffusion.guidance.kept_step == 3
    code, exported = _sample(tmp_path / "export", tmp_path / "from_export")
    assert code == 0 and np.array_equal(exported, kept)


def test_a_kept_guide_without_its_callback_is_refused_before_anything_is_written(tmp_path, capsys):
    import train

    out = tmp_path / "run"
    argv = [*tiny_overrides(max_steps=2), "guidance=autoguidance_kept", "~callbacks.keep_guide", f"hydra.run.dir={out}"]
    assert run_hydra_main(train.main, argv) == 2
    err = capsys.readouterr().err
    assert "guidance.guide_ckpt" in err and "KeepGuide" in err
    assert not (out / "checkpoints").exists()


def test_a_kept_guide_under_fsdp_is_refused_in_one_line():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from difflab.callbacks.keep_guide import KeepGuide

    trainer = SimpleNamespace(strategy=ModelParallelStrategy())
    with pytest.raises(ConfigError, match="guide_ckpt=kept is not supported with trainer=fsdp"):
        KeepGuide().on_train_start(trainer, _kept_module())
    KeepGuide().on_train_start(trainer, _module("flow"))  # CFG: the callback stays idle


def test_resume_restores_the_kept_guide_from_the_checkpoint():
    from difflab.callbacks.keep_guide import KeepGuide

    saved = _kept_module()
    saved.diffusion.guidance.keep(_module("flow", seed=1).state_dict(), step=5, like=saved)
    checkpoint: dict = {}
    KeepGuide().on_save_checkpoint(None, saved, checkpoint)
    resumed = _kept_module()
    KeepGuide().on_load_checkpoint(None, resumed, checkpoint)
    assert resumed.diffusion.guidance.kept_step == 5
    a = resumed.diffusion.sample(resumed, 4, LABELS, noise=_noise())
    b = saved.diffusion.sample(saved, 4, LABELS, noise=_noise())
    assert torch.equal(a, b)
