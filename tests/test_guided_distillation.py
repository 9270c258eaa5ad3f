"""Guidance baked into a distilled student (Meng et al. 2023; ``method.guidance_scales`` of progressive distillation,
reflow, consistency distillation and sCM, ``guidance=distilled``): the guidance-scale input of every denoiser (zero at
the start, so a student starts as its unguided teacher), the one-pass guided model function, each method's teacher
guided at each sample's own scale (reflow: each coupling drawn and kept at its own), the loss handing the student its
scale, real runs whose one student samples at several scales through sample.py, and one-line refusals."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from difflab.conditioning.base import ClassConditioner
from difflab.diffusion.guidance import CFG, AutoguidanceCFG, CFGpp, DistilledGuidance
from difflab.diffusion.objectives import Objective
from difflab.diffusion.processes import FlowProcess
from difflab.diffusion.samplers import consistency, ddim, euler, sampling_grid
from difflab.diffusion.system import Diffusion
from difflab.lit_modules.diffusion_module import DiffusionModule
from difflab.methods.consistency import ConsistencyTraining
from difflab.methods.couplings import Couplings, identity_key, read_couplings, write_couplings
from difflab.methods.guidance_input import GuidanceScales
from difflab.methods.progressive import ProgressiveDistillation
from difflab.methods.reflow import Reflow
from difflab.methods.scm import ContinuousConsistency
from difflab.models.dit import DiT, VideoDiT
from difflab.models.layers import add_guidance_input, has_guidance_input
from difflab.models.unet2d import UNet2D
from difflab.models.unet3d import UNet3D
from difflab.models.vivit import ViViT
from difflab.utils.errors import ConfigError, CorruptDataError
from difflab.utils.frozen import Frozen
from tests.helpers import compose_train, run_hydra_main, tiny_overrides
from tests.test_guidance_methods import _module

torch.set_num_threads(1)

TINY_UNET = dict(in_channels=1, base_channels=8, channel_mults=(1, 2), attention_levels=(1,), groups=4, head_dim=8)


def _nets(guidance_input, interval_input=False):
    """Every denoiser, tiny, with a condition vector; with the given optional inputs."""
    torch.manual_seed(0)
    extra = dict(cond_dim=4, guidance_input=guidance_input, interval_input=interval_input)
    return {
        "unet": UNet2D(**TINY_UNET, **extra),
        "dit": DiT(sample_shape=(1, 8, 8), size="T", patch_size=4, **extra),
        "unet3d": UNet3D(
            **{**TINY_UNET, "num_res_blocks": 1}, num_transformer_blocks=1, transformer_head_dim=8, **extra
        ),
        "video_dit": VideoDiT(sample_shape=(1, 2, 8, 8), size="T", patch_size=4, **extra),
        "vivit": ViViT(in_channels=1, patch_size=4, hidden_dim=16, depth=2, head_dim=8, **extra),
    }


def _input(kind, n):
    return torch.randn(n, 1, 2, 8, 8) if kind in VIDEO else torch.randn(n, 1, 8, 8)


VIDEO = ("unet3d", "video_dit", "vivit")
KINDS = ("unet", "dit", *VIDEO)


def _nudge(module: nn.Module, seed: int = 1) -> None:
    """Move every parameter off its initialisation (zero output layers included) so each input matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


# ---------------------------------------------------------------- the network input
@pytest.mark.parametrize("kind", KINDS)
def test_the_scale_input_adds_nothing_until_trained_then_changes_the_output(kind):
    net = _nets(True)[kind].eval()
    x, t, cond = _input(kind, 3), torch.tensor([100.0, 500.0, 900.0]), torch.randn(3, 4)
    plain = net(x, t, cond)
    for w in (torch.tensor([0.0, 2.5, 4.0]), torch.tensor(3.0)):
        assert torch.equal(net(x, t, cond, guidance_scale=w), plain)  # zero output layer: the student = the teacher
    _nudge(net)
    one, three = net(x, t, cond, guidance_scale=torch.ones(3)), net(x, t, cond, guidance_scale=torch.full((3,), 3.0))
    assert torch.allclose(net(x, t, cond), one)  # no scale given: 1, plain conditional
    assert not torch.allclose(one, three, atol=1e-4)
    per_row = net(x, t, cond, guidance_scale=torch.tensor([1.0, 3.0, 1.0]))
    assert torch.allclose(per_row[1], three[1], atol=1e-5) and torch.allclose(per_row[0], one[0], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_teacher_widened_with_the_input_keeps_its_outputs_and_matches_the_students_keys(kind):
    teacher, student = _nets(False)[kind], _nets(True)[kind]
    _nudge(teacher)
    x, t, cond = _input(kind, 2), torch.tensor([200.0, 700.0]), torch.randn(2, 4)
    before = teacher(x, t, cond)
    assert not has_guidance_input(teacher)
    with pytest.raises(ValueError, match="guidance_input=true"):
        teacher(x, t, cond, guidance_scale=torch.ones(2))
    add_guidance_input(teacher)
    assert has_guidance_input(teacher) and set(teacher.state_dict()) == set(student.state_dict())
    assert torch.equal(teacher(x, t, cond, guidance_scale=torch.full((2,), 3.0)), before)
    student.load_state_dict(teacher.state_dict())  # one set of weights for both


@pytest.mark.parametrize("kind", VIDEO)
def test_video_denoisers_take_meanflows_interval_with_zero_the_default(kind):
    net = _nets(False, interval_input=True)[kind].eval()
    _nudge(net)
    x, t, cond = _input(kind, 2), torch.tensor([500.0, 900.0]), torch.randn(2, 4)
    assert torch.allclose(net(x, t, cond), net(x, t, cond, interval=torch.zeros(2)))
    assert not torch.allclose(net(x, t, cond), net(x, t, cond, interval=torch.tensor([300.0, 300.0])), atol=1e-4)
    with pytest.raises(ValueError, match="interval_input=true"):
        _nets(False)[kind](x, t, cond, interval=torch.zeros(2))


def test_a_denoiser_without_a_time_embedding_cannot_be_widened():
    with pytest.raises(ValueError, match="no time embedding"):
        add_guidance_input(nn.Conv2d(1, 1, 3))


# ---------------------------------------------------------------- sampling with the scale as input
class Recorder(nn.Module):
    """A network whose output depends on x, t, the condition and the scale, recording each call's scale."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.scales: list = []

    def forward(self, x, t, cond=None, context=None, context_mask=None, guidance_scale=None):
        self.scales.append(None if guidance_scale is None else guidance_scale.clone())
        w = torch.ones(x.shape[0]) if guidance_scale is None else guidance_scale.expand(x.shape[0])
        bias = (self.lin(cond).view(-1) * w + torch.cos(t / 1000)).view(-1, 1, 1, 1)
        return 0.5 * x + bias


def _diffusion(guidance):
    return Diffusion(
        FlowProcess(t_min=0),
        Objective(prediction="flow", x0_clip="none"),
        functools.partial(ddim, steps=2),
        guidance=guidance,
        conditioner=ClassConditioner(3, embed_dim=4),
        sample_shape=(1, 2, 2),
    )


def test_distilled_guidance_calls_the_network_once_per_step_with_each_samples_scale():
    d = _diffusion(DistilledGuidance(scale=3.0, per_class={1: 1.5}))
    net = Recorder()
    labels = torch.tensor([0, 1, 2])
    x = torch.randn(3, 1, 2, 2)
    fn = d.guided_fn(net, labels)
    x0, eps = fn(x, 0.7)
    assert len(net.scales) == 1 and torch.equal(net.scales[0], torch.tensor([3.0, 1.5, 3.0]))  # one pass, no null
    cond = d.condition(labels)
    t = torch.full((3,), 0.7, dtype=torch.float64)
    out = net(x, d.process.net_time(t).float(), cond["vector"], guidance_scale=torch.tensor([3.0, 1.5, 3.0]))
    want = d.x0_eps_estimate(lambda *a, **k: out, x, t.float(), cond)  # the conditional prediction at that scale
    assert torch.allclose(x0, want[0], atol=1e-5) and torch.allclose(eps, want[1], atol=1e-5)
    net.scales.clear()
    d.sample(net, 3, labels, guidance={"scale": 2.0})  # a sampling-time override reaches the network
    assert len(net.scales) == 2 and all(torch.equal(s, torch.tensor([2.0, 1.5, 2.0])) for s in net.scales)


def test_cfg_never_hands_the_network_a_scale():
    net = Recorder()
    _diffusion(CFG(scale=2.0)).sample(net, 3, torch.tensor([0, 1, 2]))
    assert net.scales and all(s is None for s in net.scales)


# ---------------------------------------------------------------- the method
def _student(guidance=None, guidance_input=True):
    torch.manual_seed(0)
    net = functools.partial(UNet2D, **TINY_UNET, guidance_input=guidance_input)
    d = _diffusion(guidance or DistilledGuidance(scale=2.0))
    d.sample_shape = (1, 8, 8)
    module = DiffusionModule(net=net, diffusion=d)
    _nudge(module.denoiser)
    return module


def _method(module, teacher_guidance=None):
    method = ProgressiveDistillation("in-memory", 8, 2, 3, teacher_guidance=teacher_guidance, guidance_scales=[1, 4])
    method._teacher = Frozen(module)  # the module teaches itself
    return method


def test_the_first_rounds_teacher_is_guided_at_each_samples_own_scale():
    module = _student()
    d = module.diffusion
    method = _method(module, CFG(scale=2.0))
    grid = sampling_grid(d.process, 8)
    labels, index = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 2, 2])
    scales = torch.tensor([1.0, 3.5, 2.0, 4.0])
    x_t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    together = method.teacher_two_steps(x_t, labels, index, grid, scales)
    for row in range(4):
        i = int(index[row])
        fn = d.guided_fn(module, labels[row : row + 1], CFG(scale=float(scales[row])))  # plain CFG at that scale
        x = x_t[row : row + 1]
        for (t, _, _), (_, a, s) in zip(grid[2 * i : 2 * i + 2], grid[2 * i + 1 : 2 * i + 3]):
            x0, eps = fn(x, t)
            x = a * x0 + s * eps
        assert torch.allclose(together[row : row + 1], x, atol=1e-5), row
    assert not torch.allclose(together, method.teacher_two_steps(x_t, labels, index, grid), atol=1e-3)


def test_later_teachers_are_given_the_scale_as_input_and_not_guided_again():
    module = _student()
    d = module.diffusion
    method = _method(module, CFG(scale=2.0))
    method.round = 1
    grid = sampling_grid(d.process, 4)
    labels, index = torch.tensor([0, 1]), torch.tensor([0, 0])
    scales = torch.tensor([1.5, 3.0])
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    got = method.teacher_two_steps(x_t, labels, index, grid, scales)
    cond = d.condition(labels)
    x = x_t
    for (t, _, _), (_, a, s) in zip(grid[:2], grid[1:3]):
        tt = torch.full((2,), t)
        x0, eps = d.x0_eps_estimate(module, x, tt, {**cond, "guidance_scale": scales})  # one conditional pass
        x = a * x0 + s * eps
    assert torch.allclose(got, x, atol=1e-5)


def test_the_loss_draws_a_scale_per_sample_and_hands_it_to_student_and_teacher(monkeypatch):
    module = _student()
    method = _method(module, CFG(scale=2.0))
    seen: dict = {}

    def teacher(x_t, raw, index, grid, scales):
        seen["teacher"] = scales
        return x_t

    monkeypatch.setattr(method, "teacher_two_steps", teacher)
    calls = []
    real = module.denoiser.forward
    monkeypatch.setattr(module.denoiser, "forward", lambda *a, **k: calls.append(k) or real(*a, **k))
    batch = {"x": torch.rand(64, 1, 8, 8) * 2 - 1, "label": torch.arange(64) % 3}
    loss = method.loss(module, batch)
    w = seen["teacher"]
    assert loss.isfinite() and w.shape == (64,) and 1 <= w.min() and w.max() <= 4 and w.std() > 0.5
    assert torch.equal(calls[-1]["guidance_scale"], w)


def test_bad_scale_ranges_are_refused_in_one_line():
    for bad in ([4, 1], [1], [-1, 2], [2, 2]):
        with pytest.raises(ConfigError, match=r"method.guidance_scales=.*\[lo, hi\]"):
            ProgressiveDistillation("t.ckpt", 8, 2, guidance_scales=bad)


def test_a_student_without_the_input_or_sampling_with_cfg_is_refused():
    scales = GuidanceScales(1, 4)
    with pytest.raises(ConfigError, match="model.net.guidance_input=true"):
        scales.refuse_student(_student(guidance_input=False))
    with pytest.raises(ConfigError, match="samples with guidance=distilled.*is cfg"):
        scales.refuse_student(_student(guidance=CFG(scale=2.0)))
    scales.refuse_student(_student())


def test_teacher_guidance_that_cannot_take_every_drawn_scale_is_refused():
    scales = GuidanceScales(1, 4)
    scales.refuse_teacher_guidance(CFG(scale=2.0))
    with pytest.raises(ConfigError, match=r"guidance_scales=\[1.0, 4.0\] cannot all guide the teacher's cfgpp"):
        scales.refuse_teacher_guidance(CFGpp(scale=0.6))
    both = AutoguidanceCFG(scale=2.0, guide_ckpt="kept", cfg_scale=2.0)  # two strengths: the scale moves one only
    with pytest.raises(ConfigError, match="cannot guide the teacher's autoguidance_cfg"):
        scales.refuse_teacher_guidance(both)
    with pytest.raises(ConfigError, match="the teacher, which has no scale input"):
        scales.refuse_teacher_guidance(DistilledGuidance(scale=2.0))
    with pytest.raises(ConfigError, match="guidance.per_class=null"):
        scales.refuse_teacher_guidance(CFG(scale=2.0, per_class={1: 3.0}))
    for bad in ([1, float("inf")], [float("nan"), 2]):
        with pytest.raises(ConfigError, match=r"\[lo, hi\] with 0 <= lo < hi, finite"):
            GuidanceScales.parse(bad)


def test_a_teacher_guided_by_its_own_checkpoints_guidance_is_checked_against_the_scales(monkeypatch):
    """method.teacher_guidance=null: the teacher checkpoint's own guidance guides it, so that one is checked."""
    import difflab.methods.guidance_input as guidance_input

    teacher = _student(guidance=CFGpp(scale=0.6), guidance_input=False)
    monkeypatch.setattr(guidance_input, "adopt_teacher", lambda *a, **k: Frozen(teacher))
    with pytest.raises(ConfigError, match="cannot all guide the teacher's cfgpp"):
        GuidanceScales(1, 4).adopt_teacher(_student(), "t.ckpt", None)
    assert GuidanceScales(1, 4).adopt_teacher(_student(), "t.ckpt", CFG(scale=2.0)).module is teacher


@pytest.mark.parametrize(
    "make",
    [
        lambda: ProgressiveDistillation("missing.ckpt", 8, 2, guidance_scales=[1, 4]),
        lambda: Reflow("missing.ckpt", guidance_scales=[1, 4]),
        lambda: ConsistencyTraining("missing.ckpt", guidance_scales=[1, 4]),
        lambda: ContinuousConsistency("missing.ckpt", guidance_scales=[1, 4]),
    ],
    ids=["progressive", "reflow", "consistency", "scm"],
)
def test_every_method_refuses_a_student_without_the_input_before_reading_its_teacher(make):
    method = make()
    module = _student(guidance_input=False)
    module.diffusion.sampler = {
        "progressive": functools.partial(ddim, steps=2),
        "reflow": functools.partial(euler, steps=1),
    }.get(method.name, functools.partial(consistency, steps=1))
    with pytest.raises(ConfigError, match="model.net.guidance_input=true"):  # not the missing file's error
        method.setup(module, "fit")


# ---------------------------------------------------------------- consistency, sCM and reflow
def _recording(module, monkeypatch) -> list:
    """The keyword inputs of every call of the module's denoiser, in order."""
    calls: list = []
    real = module.denoiser.forward
    monkeypatch.setattr(module.denoiser, "forward", lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


def test_consistency_distillations_teacher_steps_at_each_samples_scale():
    module = _student()
    process = module.diffusion.process
    method = ConsistencyTraining("in-memory", teacher_guidance=CFG(scale=2.0), guidance_scales=[1, 4])
    method._teacher = Frozen(module)  # the module teaches itself
    labels, scales = torch.tensor([0, 1, 2, 0]), torch.tensor([1.0, 3.5, 2.0, 4.0])
    t = torch.tensor([0.8, 0.8, 0.4, 0.4], dtype=torch.float64)
    r = torch.tensor([0.5, 0.6, 0.0, 0.2], dtype=torch.float64)
    x_t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    got = method.teacher_step(x_t, labels, t, r, scales)
    for row in range(4):
        x0, eps = module.diffusion.guided_fn(module, labels[row : row + 1], CFG(scale=float(scales[row])))(
            x_t[row : row + 1], float(t[row])
        )
        a, s = process.coefficients_like(r[row : row + 1], x0)
        assert torch.allclose(got[row : row + 1], a * x0 + s * eps, atol=1e-5), row
    assert not torch.allclose(got, method.teacher_step(x_t, labels, t, r), atol=1e-3)  # CFG 2 everywhere


def test_consistency_distillation_hands_each_samples_scale_to_both_student_calls(monkeypatch):
    module = _student()
    method = ConsistencyTraining("in-memory", teacher_guidance=CFG(scale=2.0), guidance_scales=[1, 4])
    method._teacher = Frozen(module)
    seen: dict = {}
    monkeypatch.setattr(method, "teacher_step", lambda x_t, raw, t, r, scales: seen.update(w=scales) or x_t)
    calls = _recording(module, monkeypatch)
    batch = {"x": torch.rand(64, 1, 8, 8) * 2 - 1, "label": torch.arange(64) % 3}
    assert method.loss(module, batch).isfinite()
    w = seen["w"]
    assert w.shape == (64,) and 1 <= w.min() and w.max() <= 4 and w.std() > 0.5
    assert len(calls) == 2 and all(torch.equal(k["guidance_scale"], w) for k in calls)


def test_scms_teacher_velocity_is_guided_at_each_samples_scale_and_the_jvp_sees_the_scale(monkeypatch):
    module = _student()
    method = ContinuousConsistency("in-memory", teacher_guidance=CFG(scale=2.0), guidance_scales=[1, 4])
    method._teacher = Frozen(module)
    labels, scales = torch.tensor([0, 1, 2]), torch.tensor([1.0, 3.0, 4.0])
    t = torch.tensor([1.2, 0.7, 0.3])
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    got = method.teacher_velocity(x, labels, t, scales)
    for row in range(3):
        at_w = ContinuousConsistency("in-memory", teacher_guidance=CFG(scale=float(scales[row])))
        at_w._teacher = Frozen(module)
        want = at_w.teacher_velocity(x[row : row + 1], labels[row : row + 1], t[row : row + 1])
        assert torch.allclose(got[row : row + 1], want, atol=1e-5), row
    seen: dict = {}
    real = method.teacher_velocity
    monkeypatch.setattr(method, "teacher_velocity", lambda x, raw, t, w: seen.update(w=w) or real(x, raw, t, w))
    calls = _recording(module, monkeypatch)
    batch = {"x": torch.rand(16, 1, 8, 8) * 2 - 1, "label": torch.arange(16) % 3}
    assert method.loss(module, batch).isfinite()
    student = [k for k in calls if "guidance_scale" in k]  # the teacher (CFG) is never handed a scale
    assert len(student) == 2 and all(torch.equal(k["guidance_scale"], seen["w"]) for k in student)  # JVP + F_theta


def test_consistency_without_a_teacher_refuses_guidance_scales_in_one_line():
    with pytest.raises(ConfigError, match=r"guidance_scales=\[1.0, 4.0\] bakes a teacher's guidance.*teacher_ckpt"):
        ConsistencyTraining(guidance_scales=[1, 4])
    with pytest.raises(ConfigError, match="scm without one"):
        ContinuousConsistency(guidance_scales=[1, 4])


def test_guided_couplings_are_the_teachers_samples_at_each_couplings_own_scale():
    module = _module("flow")  # CFG 2 by default
    d = module.diffusion
    method = Reflow("in-memory", num_pairs=6, chunk=4, guidance_scales=[1, 4])
    method._teacher = Frozen(module)
    c = method.draw(torch.device("cpu"), progress=False)
    plain = Reflow("in-memory", num_pairs=6, chunk=4)
    plain._teacher = Frozen(module)
    assert torch.equal(c.noise, plain.draw(torch.device("cpu"), progress=False).noise)  # scales drawn after the noise
    assert c.scales is not None and c.scales.shape == (6,) and 1 <= c.scales.min() and c.scales.max() <= 4
    for row in range(6):
        want = d.sample(
            module, 1, c.conditions[row : row + 1], noise=c.noise[row : row + 1], guidance_scale=float(c.scales[row])
        )
        assert torch.allclose(c.samples[row : row + 1], want, atol=1e-5), row


def test_guided_couplings_round_trip_and_damaged_scales_are_refused(tmp_path):
    identity = {"teacher_sha256": "ab" * 32, "count": 4, "seed": 0, "guidance_scales": [1.0, 4.0]}
    c = Couplings(torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2), torch.arange(4), torch.tensor([1.0, 2.5, 4.0, 3.0]))
    out = write_couplings(tmp_path / identity_key(identity), identity, c)
    back = read_couplings(out, identity, (1, 2, 2))
    assert back.scales is not None and torch.equal(back.scales, c.scales)
    assert torch.equal(back.rows(torch.tensor([2, 0]))[3], torch.tensor([4.0, 1.0]))
    assert identity_key(identity) != identity_key({k: v for k, v in identity.items() if k != "guidance_scales"})
    np.save(out / "scales.npy", np.array([1.0, 2.0, 9.0, 3.0], dtype=np.float32))
    with pytest.raises(CorruptDataError, match=r"scales.npy is not 4 float32 scales in \[1.0, 4.0\]; delete"):
        read_couplings(out, identity, (1, 2, 2))
    for odd in (np.array(["1", "2", "3", "4"]), np.array([1.0, np.nan, 2.0, 3.0], dtype=np.float32), np.ones(4)):
        np.save(out / "scales.npy", odd)
        with pytest.raises(CorruptDataError, match="scales.npy is not 4 float32 scales"):
            read_couplings(out, identity, (1, 2, 2))
    (out / "scales.npy").unlink()
    with pytest.raises(CorruptDataError, match="cannot read .*scales.npy"):
        read_couplings(out, identity, (1, 2, 2))


def test_the_reflow_student_takes_each_couplings_scale(monkeypatch):
    module = _student()
    method = Reflow("in-memory", guidance_scales=[1, 4])
    scales = torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
    method.couplings = Couplings(torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8), torch.arange(6) % 3, scales)
    calls = _recording(module, monkeypatch)
    batch = {"x": torch.randn(5, 1, 8, 8), "label": torch.zeros(5, dtype=torch.long)}
    torch.manual_seed(3)
    assert method.loss(module, batch).isfinite()
    torch.manual_seed(3)
    index = torch.randint(6, (1, 5))[0]
    assert len(calls) == 1 and torch.equal(calls[0]["guidance_scale"], scales[index])


# ---------------------------------------------------------------- a real run
GUIDED = [
    "experiment=digits_progressive_guided",
    "method.teacher_steps=8",
    "method.student_steps=2",
    "method.steps_per_round=2",
]


def _tiny(**kw):
    return [a for a in tiny_overrides(**kw) if not a.startswith("sampler.steps")]


@pytest.fixture(scope="module")
def guided_run(run_dir, tmp_path_factory):
    import train

    out = tmp_path_factory.mktemp("guided")
    teacher = run_dir / "checkpoints" / "last.ckpt"
    args = [*_tiny(max_steps=4, save_every=2), *GUIDED, f"method.teacher_ckpt={teacher}", "logger=csv"]
    assert run_hydra_main(train.main, [*args, f"hydra.run.dir={out}"]) == 0
    return out, teacher, args


def test_a_guided_student_starts_as_its_teacher_and_resumes_exactly(guided_run, tmp_path):
    import train
    from difflab.checkpoints import load_checkpoint, load_weights

    out, teacher, args = guided_run
    ckpts = out / "checkpoints"
    first = load_checkpoint(ckpts / "step_0000002.ckpt")
    round_two_teacher = load_checkpoint(ckpts / "step_0000004.ckpt")["difflab_method"]["teacher"]
    assert any("guidance_mlp" in k for k in round_two_teacher)  # later teachers carry the student's input
    teacher_ema = load_weights(teacher)["ema"]
    assert not any("guidance_mlp" in k for k in teacher_ema)
    assert (
        run_hydra_main(train.main, [*args, f"ckpt_path={ckpts / 'step_0000002.ckpt'}", f"hydra.run.dir={tmp_path}"])
        == 0
    )
    again = load_checkpoint(tmp_path / "checkpoints" / "step_0000004.ckpt")
    final = load_checkpoint(ckpts / "step_0000004.ckpt")
    for k, v in final["state_dict"].items():
        assert torch.allclose(v, again["state_dict"][k], atol=1e-6), k
    assert first["state_dict"].keys() == final["state_dict"].keys()


def _guided_student(ckpt):
    """The student of a guided run, read back as sample.py reads it, with its scale input made to matter."""
    from difflab.diffusion.system import load_for_sampling

    diffusion, net = load_for_sampling(ckpt)
    assert isinstance(diffusion.guidance, DistilledGuidance) and diffusion.guidance.scale == 2.0
    assert has_guidance_input(net)
    _nudge(net.embed.guidance_mlp)  # a few steps barely move the zero-initialised input: make the scale matter
    noise = torch.randn(4, *diffusion.sample_shape, generator=torch.Generator().manual_seed(0))
    at = {w: diffusion.sample(net, 4, torch.arange(4), noise=noise, guidance={"scale": w}) for w in (1.0, 3.0)}
    assert not torch.allclose(at[1.0], at[3.0], atol=1e-4)
    return diffusion


def test_one_student_samples_at_every_scale_through_sample_py(guided_run, tmp_path):
    import sample

    out, _, _ = guided_run
    ckpt = out / "checkpoints" / "last.ckpt"
    _guided_student(ckpt)
    for w in ("1.0", "3.0"):
        code = run_hydra_main(
            sample.main, [f"ckpt_path={ckpt}", "n=4", f"guidance.scale={w}", f"out_dir={tmp_path / w}", "device=cpu"]
        )
        assert code == 0 and any((tmp_path / w).glob("*.png")), w


def test_preflight_lets_a_student_add_the_input_to_an_unguided_teacher(run_dir, tmp_path):
    from difflab.config_checks import check_config

    teacher = run_dir / "checkpoints" / "last.ckpt"
    cfg = compose_train(tmp_path, [*_tiny(), *GUIDED, f"method.teacher_ckpt={teacher}"])
    assert check_config(cfg, "train") == []
    cfg = compose_train(tmp_path, [*_tiny(), *GUIDED, f"method.teacher_ckpt={teacher}", "model.net.base_channels=24"])
    assert any("base_channels" in p for p in check_config(cfg, "train"))


def test_the_guided_student_starts_as_its_teacher_with_a_silent_scale_input(run_dir, tmp_path):
    from hydra.utils import instantiate

    from difflab.checkpoints import load_weights
    from difflab.pipeline import fill_from_datamodule

    teacher = run_dir / "checkpoints" / "last.ckpt"
    cfg = compose_train(tmp_path, [*_tiny(), *GUIDED, f"method.teacher_ckpt={teacher}"])
    fill_from_datamodule(cfg, instantiate(cfg.datamodule))
    module = instantiate(cfg.model)
    module.setup("fit")
    weights = load_weights(teacher)["ema"]
    added = {k: v for k, v in module.state_dict().items() if k not in weights}
    assert added and all(".guidance_mlp." in k for k in added)
    for k, v in weights.items():
        assert torch.equal(module.state_dict()[k], v), k
    assert not added["denoiser.embed.guidance_mlp.2.weight"].any()  # adds nothing yet


def test_an_export_of_the_student_samples_like_its_checkpoint_at_another_scale(guided_run, tmp_path):
    import export
    from difflab.diffusion.system import load_for_sampling

    out, _, _ = guided_run
    ckpt = out / "checkpoints" / "last.ckpt"
    assert run_hydra_main(export.main, [f"ckpt_path={ckpt}", f"out_dir={tmp_path / 'export'}"]) == 0
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    samples = []
    for path in (ckpt, tmp_path / "export"):
        diffusion, net = load_for_sampling(path)
        assert isinstance(diffusion.guidance, DistilledGuidance)
        samples.append(diffusion.sample(net, 4, torch.arange(4), noise=noise, guidance={"scale": 3.5}))
    assert torch.allclose(samples[0], samples[1], atol=1e-6)


def test_sampling_a_plain_model_with_distilled_guidance_fails_in_one_line(run_dir, tmp_path, capsys):
    import sample

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    code = run_hydra_main(
        sample.main, [f"ckpt_path={ckpt}", "n=2", "guidance.method=distilled", f"out_dir={tmp_path / 'o'}"]
    )
    err = capsys.readouterr().err
    assert code != 0 and "guidance_input=true" in err
    assert not any((tmp_path / "o").glob("*.png"))


# ---------------------------------------------------------------- real runs of the other methods
def test_a_guided_reflow_student_learns_couplings_drawn_at_their_own_scales(run_dir, tmp_path):
    import sample
    import train
    from difflab.methods.couplings import read_manifest

    teacher = run_dir / "checkpoints" / "last.ckpt"
    pairs, run = tmp_path / "pairs", tmp_path / "run"
    args = [
        *_tiny(max_steps=2),
        "experiment=digits_reflow_guided",
        f"method.teacher_ckpt={teacher}",
        "method.num_pairs=12",
        "method.chunk=8",
        f"method.pairs_dir={pairs}",
        "logger=csv",
        f"hydra.run.dir={run}",
    ]
    assert run_hydra_main(train.main, args) == 0
    (drawn,) = pairs.iterdir()
    manifest = read_manifest(drawn)
    assert manifest is not None and manifest["identity"]["guidance_scales"] == [1.0, 4.0]
    scales = np.load(drawn / "scales.npy", allow_pickle=False)
    assert scales.shape == (12,) and 1 <= scales.min() and scales.max() <= 4 and scales.std() > 0.3
    assert "guided at scales drawn from U[1.0, 4.0]" in (run / "train.log").read_text()
    diffusion = _guided_student(run / "checkpoints" / "last.ckpt")
    assert diffusion.describe_sampler().startswith("euler-1")
    code = run_hydra_main(
        sample.main,
        [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "n=4", "guidance.scale=3", f"out_dir={tmp_path / 's'}"],
    )
    assert code == 0 and (tmp_path / "s" / "grid.png").exists()


@pytest.mark.parametrize(
    "experiment, extra",
    [
        ("digits_consistency_guided", []),
        # the shared tiny teacher's time input (the experiment's is 1: its teacher's)
        ("digits_scm_guided", ["process.time_scale=1000", "method.warmup_steps=2"]),
    ],
    ids=["consistency", "scm"],
)
def test_a_guided_consistency_student_trains_from_its_teacher_and_samples_at_another_scale(
    experiment, extra, run_dir, tmp_path
):
    import sample
    import train

    run = tmp_path / "run"
    args = [
        *_tiny(max_steps=2),
        f"experiment={experiment}",
        f"method.teacher_ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
        "method.time_groups=4",
        *extra,
        "logger=csv",
        f"hydra.run.dir={run}",
    ]
    assert run_hydra_main(train.main, args) == 0
    assert "guided at scales drawn from U[1.0, 4.0]" in (run / "train.log").read_text()
    diffusion = _guided_student(run / "checkpoints" / "last.ckpt")
    assert diffusion.describe_sampler().startswith("consistency")
    code = run_hydra_main(
        sample.main,
        [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "n=4", "guidance.scale=3", f"out_dir={tmp_path / 's'}"],
    )
    assert code == 0 and (tmp_path / "s" / "grid.png").exists()


def test_preflight_refuses_guided_consistency_without_a_teacher(tmp_path):
    from difflab.config_checks import check_config

    problems = check_config(compose_train(tmp_path, [*_tiny(), "experiment=digits_consistency_guided"]), "train")
    assert any("bakes a teacher's guidance into the student" in p for p in problems), problems
