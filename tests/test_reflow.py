"""Reflow (method=reflow, src/methods/reflow.py, src/methods/couplings.py): the loss against Liu et al.'s formula in
their released code's convention, couplings equal to the teacher's own sampler from the same noise, written once and
read back without unpickling, a real run that reuses its couplings and resumes exactly, and one-line refusals."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from difflab.config_checks import check_config
from difflab.diffusion.objectives import Objective
from difflab.diffusion.processes import FlowProcess, VPProcess
from difflab.diffusion.samplers import euler
from difflab.diffusion.system import Diffusion
from difflab.methods.couplings import Couplings, identity_key, read_couplings, read_manifest, write_couplings
from difflab.methods.reflow import Reflow
from difflab.utils.errors import ConfigError, CorruptDataError
from difflab.utils.frozen import Frozen
from tests.helpers import compose_train, run_hydra_main, tiny_overrides
from tests.test_guidance_methods import _module

torch.set_num_threads(1)


# ---------------------------------------------------------------- the loss
def test_the_loss_on_a_coupling_is_the_released_codes_rectified_flow_loss():
    """Liu et al.'s code (gnobitab/RectifiedFlow, re-typed): z_t = t z1 + (1 - t) z0 with z0 the noise and z1 the data
    (their t = 1 is data), target z1 - z0, loss the squared error averaged over each sample. Ours runs the other way
    (t = 1 is noise, velocity noise - data): the same input at 1 - t and the same field with its sign flipped."""
    g = torch.Generator().manual_seed(0)
    data, noise, out = torch.randn(3, 5, 1, 4, 4, generator=g)
    t = torch.rand(5, generator=g)
    seen = {}

    def net(x_in, t_net):
        seen.update(x=x_in, t=t_net)
        return out

    ours = Objective(prediction="flow").losses(net, data, FlowProcess(), t=t, eps=noise)
    t_theirs = (1 - t).view(-1, 1, 1, 1)
    z_t = t_theirs * data + (1 - t_theirs) * noise
    their_prediction = -out
    theirs = ((their_prediction - (data - noise)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(seen["x"], z_t, atol=1e-6)
    assert torch.allclose(seen["t"].float(), 1000 * t)
    assert torch.allclose(ours["raw"], theirs, rtol=1e-5) and torch.allclose(ours["loss"], theirs, rtol=1e-5)


def test_given_noise_is_the_noise_of_the_loss_and_must_have_the_datas_shape():
    module = _module("flow")
    d = module.diffusion
    batch = {"x": torch.randn(4, 1, 4, 4), "label": torch.tensor([0, 1, 2, 0])}
    noise, t = torch.randn(4, 1, 4, 4), torch.rand(4)
    first = d.losses(module, batch, drop_conditions=False, t=t, noise=noise)["loss"]
    assert torch.equal(first, d.losses(module, batch, drop_conditions=False, t=t, noise=noise)["loss"])
    assert not torch.equal(first, d.losses(module, batch, drop_conditions=False, t=t, noise=-noise)["loss"])
    with pytest.raises(ValueError, match=r"paired noise of shape \(4, 1, 2, 2\)"):
        d.losses(module, batch, drop_conditions=False, t=t, noise=torch.randn(4, 1, 2, 2))


# ---------------------------------------------------------------- the couplings
def _reflow(module, **kw):
    method = Reflow("in-memory", **{"num_pairs": 6, "chunk": 4, **kw})
    method._teacher = Frozen(module)  # the module is its own teacher
    return method


def test_couplings_are_the_teachers_guided_samples_from_their_noise():
    module = _module("flow")
    d = module.diffusion
    c = _reflow(module).draw(torch.device("cpu"), progress=False)
    assert torch.equal(c.conditions, torch.arange(6) % 3)  # balanced labels
    want = d.sample(module, 6, c.conditions, noise=c.noise)  # its own sampler and CFG 2, in two chunks of 4 and 2
    assert torch.allclose(c.samples, want, atol=1e-6)
    again = _reflow(module).draw(torch.device("cpu"), progress=False)
    assert torch.equal(again.noise, c.noise)  # pairs_seed fixes the noise
    other = _reflow(module, pairs_seed=1).draw(torch.device("cpu"), progress=False)
    assert not torch.equal(other.noise, c.noise)


def test_latent_samples_are_drawn_unclipped():
    """Couplings of a latent model are latents as the sampler ends (decode=False): clipping is for pixels."""

    def five_times(model_fn, noise, process, **kw):
        return noise * 5

    class Decoder:
        module = type("M", (), {"decode": staticmethod(lambda z: z)})()

    kw = dict(sampler=five_times, sample_shape=(1, 2, 2))
    latent = Diffusion(FlowProcess(), Objective(prediction="flow"), autoencoder=Decoder(), **kw)
    pixel = Diffusion(FlowProcess(), Objective(prediction="flow"), **kw)
    noise = torch.ones(1, 1, 2, 2)
    assert latent.sample(lambda *a: a[0], 1, noise=noise, decode=False).max() == 5
    assert latent.sample(lambda *a: a[0], 1, noise=noise).max() == 1  # decoded pixels are clipped
    assert pixel.sample(lambda *a: a[0], 1, noise=noise, decode=False).max() == 1


IDENTITY = {"teacher_sha256": "ab" * 32, "count": 3, "seed": 0}


@pytest.mark.parametrize("conditions", [torch.tensor([2, 0, 1]), ["a 1", "a 2", "a 3"], None])
def test_couplings_round_trip_with_their_conditions(tmp_path, conditions):
    c = Couplings(torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), conditions)
    out = write_couplings(tmp_path / identity_key(IDENTITY), IDENTITY, c)
    back = read_couplings(out, IDENTITY, (1, 2, 2))
    assert torch.equal(back.noise, c.noise) and torch.equal(back.samples, c.samples)
    if isinstance(conditions, torch.Tensor):
        assert torch.equal(back.conditions, conditions)
    else:
        assert back.conditions == conditions
    noise, samples, cond, scales = back.rows(torch.tensor([2, 0]))
    assert torch.equal(noise, c.noise[[2, 0]]) and torch.equal(samples, c.samples[[2, 0]])
    assert cond is None if conditions is None else list(cond) == [conditions[2], conditions[0]]
    assert scales is None and not (out / "scales.npy").exists()  # no scales unless the student takes them


def test_the_directory_name_follows_what_drew_the_couplings():
    assert identity_key(IDENTITY) == identity_key(dict(reversed(list(IDENTITY.items()))))
    assert identity_key(IDENTITY) != identity_key({**IDENTITY, "seed": 1})
    assert len(identity_key(IDENTITY)) == 16


class _Trap:
    """Unpickling this object would create a file: a coupling file that ran code would show it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _written(tmp_path):
    c = Couplings(torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.tensor([0, 1, 2]))
    return write_couplings(tmp_path / "set", IDENTITY, c)


def test_a_pickled_coupling_file_is_refused_without_running_it(tmp_path):
    out = _written(tmp_path)
    trap = tmp_path / "ran"
    np.save(out / "samples.npy", np.array([_Trap(trap)], dtype=object), allow_pickle=True)
    with pytest.raises(CorruptDataError, match=r"samples\.npy .*delete .* to draw the couplings again"):
        read_couplings(out, IDENTITY, (1, 2, 2))
    assert not trap.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda out: np.save(out / "noise.npy", np.zeros((3, 1, 2, 2), np.float64)), r"noise\.npy holds float64"),
        (lambda out: np.save(out / "labels.npy", np.zeros(2, np.int64)), r"labels\.npy is not 3 int64 labels"),
        (lambda out: (out / "manifest.json").write_text("{"), r"cannot read .*manifest\.json"),
        (lambda out: (out / "manifest.json").unlink(), r"no complete coupling set"),
    ],
)
def test_damaged_couplings_are_refused_in_one_line(tmp_path, damage, message):
    out = _written(tmp_path)
    damage(out)
    with pytest.raises(CorruptDataError, match=message) as err:
        read_couplings(out, IDENTITY, (1, 2, 2))
    assert "\n" not in str(err.value)


def test_couplings_of_another_teacher_are_refused(tmp_path):
    out = _written(tmp_path)
    with pytest.raises(CorruptDataError, match="drawn by another teacher or sampler"):
        read_couplings(out, {**IDENTITY, "teacher_sha256": "cd" * 32}, (1, 2, 2))
    with pytest.raises(CorruptDataError, match=r"not float32 \(3, 1, 4, 4\)"):
        read_couplings(out, IDENTITY, (1, 4, 4))


def test_the_method_trains_on_its_couplings_not_the_batch():
    """The loss is the flow loss on pairs drawn from the couplings, whatever images the datamodule sends."""
    module = _module("flow")
    method = _reflow(module)
    method.couplings = Couplings(torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4), torch.arange(6) % 3)
    batch = {"x": torch.randn(5, 1, 4, 4), "label": torch.zeros(5, dtype=torch.long)}
    torch.manual_seed(3)
    loss = method.loss(module, batch)
    torch.manual_seed(3)
    index = torch.randint(6, (1, 5))[0]
    t = FlowProcess().sample_times(5)  # the process's density, drawn after the rows (as the loss draws them)
    noise, samples, labels, _ = method.couplings.rows(index)
    pairs = {"x": samples, "label": labels}
    want = module.diffusion.losses(module, pairs, drop_conditions=False, t=t, noise=noise)["loss"].mean()
    assert torch.allclose(loss, want)
    batch["x"] = batch["x"] * 100
    torch.manual_seed(3)
    assert torch.allclose(method.loss(module, batch), want)  # the batch's images play no part


def test_reflow_needs_a_teacher_and_a_flow_process():
    with pytest.raises(ConfigError, match="method=reflow needs method.teacher_ckpt"):
        Reflow(None)
    with pytest.raises(ValueError, match="use process=flow, not vp"):
        Reflow("x").check(VPProcess("cosine", 50), functools.partial(euler, steps=1))


# ---------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def teacher_ckpt(run_dir):
    return run_dir / "checkpoints" / "last.ckpt"


REFLOW = ["method=reflow", "method.num_pairs=12", "method.chunk=8", "process.t_min=0", "process.density=uniform"]


def _tiny(**kw):
    return [a for a in tiny_overrides(**kw) if not a.startswith("sampler.steps")]


def _train(tmp, teacher, pairs, *extra, max_steps=4):
    import train

    argv = [*_tiny(max_steps=max_steps), *REFLOW, f"method.teacher_ckpt={teacher}", f"method.pairs_dir={pairs}"]
    return run_hydra_main(train.main, [*argv, "logger=csv", f"hydra.run.dir={tmp}", *extra])


def test_reflow_draws_its_couplings_once_and_resumes_exactly(teacher_ckpt, tmp_path):
    from difflab.checkpoints import load_checkpoint
    from difflab.diffusion.system import load_for_sampling

    pairs = tmp_path / "pairs"
    assert _train(tmp_path / "run", teacher_ckpt, pairs) == 0
    (drawn,) = pairs.iterdir()
    manifest = read_manifest(drawn)
    assert manifest is not None and manifest["count"] == 12
    assert manifest["identity"]["teacher_sha256"] and manifest["identity"]["guidance"].startswith("CFG(scale=2.0")
    assert drawn.name == identity_key(manifest["identity"])
    stamp = {p.name: p.stat().st_mtime_ns for p in drawn.iterdir()}
    # another seed of the same teacher reads the same couplings; a resume from step 2 ends where the first run did
    ckpts = tmp_path / "run" / "checkpoints"
    assert _train(tmp_path / "resumed", teacher_ckpt, pairs, f"ckpt_path={ckpts / 'step_0000002.ckpt'}") == 0
    assert _train(tmp_path / "seed1", teacher_ckpt, pairs, "seed=1", max_steps=2) == 0
    assert list(pairs.iterdir()) == [drawn] and {p.name: p.stat().st_mtime_ns for p in drawn.iterdir()} == stamp
    final = load_checkpoint(ckpts / "step_0000004.ckpt")
    again = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_0000004.ckpt")
    for k, v in final["state_dict"].items():
        assert torch.allclose(v, again["state_dict"][k], atol=1e-6), k
    assert "difflab_method" not in final  # the couplings are on disk, not in the checkpoint
    # the student is an ordinary checkpoint: 1-step Euler, unguided
    diffusion, net = load_for_sampling(ckpts / "last.ckpt")
    assert diffusion.describe_sampler().startswith("euler-1") and diffusion.guidance.scale == 1.0
    out = diffusion.sample(net, 4)
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()


def _problems(tmp_path, *overrides):
    return check_config(compose_train(tmp_path, [*_tiny(), *overrides]), "train")


def test_preflight_refuses_reflow_without_a_teacher(tmp_path):
    problems = _problems(tmp_path, "method=reflow")
    assert problems and "method=reflow needs method.teacher_ckpt" in problems[0], problems


def test_preflight_refuses_a_reflow_teacher_of_another_network_but_not_another_density(teacher_ckpt, tmp_path):
    problems = _problems(tmp_path, *REFLOW, f"method.teacher_ckpt={teacher_ckpt}", "model.net.base_channels=16")
    assert problems and "model.net.base_channels=8 where this run has 16" in problems[0], problems
    assert _problems(tmp_path, *REFLOW, f"method.teacher_ckpt={teacher_ckpt}") == []  # uniform times: allowed


def test_the_manifest_names_its_format(tmp_path):
    out = _written(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"].startswith("difflab-reflow-couplings/") and manifest["identity"] == IDENTITY


def test_couplings_with_labels_beyond_the_class_count_are_refused(tmp_path):
    module = _module("flow")  # 3 classes
    method = _reflow(module, pairs_dir=str(tmp_path))
    c = Couplings(torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 7]))
    write_couplings(method.directory(), method.identity(), c)
    with pytest.raises(CorruptDataError, match=r"labels outside 0\.\.2"):
        method.prepare(module)
