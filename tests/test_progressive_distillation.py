"""Progressive distillation (method=progressive, src/methods/progressive.py, src/diffusion/distillation.py): the
target against Salimans & Ho's formula and their released code's form, the truncated-SNR weighting, nested grids,
the teacher's two steps against the repo's DDIM sampler, a perfect student reproducing the teacher with half the
steps, rounds and exact resume in a real run, and one-line refusals that write nothing."""

from __future__ import annotations

import functools
import os
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F

from difflab.config_checks import check_config
from difflab.configs.schema import ROUND_INTERVALS
from difflab.diffusion.distillation import halving_grid, progressive_target, truncated_snr_weight
from difflab.diffusion.processes import EDMProcess, FlowProcess, VPProcess
from difflab.diffusion.samplers import ddim, sampling_grid
from difflab.methods.progressive import ProgressiveDistillation
from difflab.methods.rounds import budget_mismatch, round_count, round_gcd, round_total
from difflab.utils.errors import ConfigError
from tests.helpers import compose_train, run_hydra_main, tiny_overrides
from tests.test_config_validation import _command
from tests.test_guidance_methods import _module

torch.set_num_threads(1)


# ---------------------------------------------------------------- the math
def test_one_student_step_to_the_target_lands_on_the_teachers_point():
    g = torch.Generator().manual_seed(0)
    x_t, x_s = torch.randn(2, 5, 3, generator=g)
    a_t, s_t, a_s, s_s = torch.rand(4, 5, 1, generator=g, dtype=torch.float64).float() + 0.1
    x0 = progressive_target(x_t, x_s, a_t, s_t, a_s, s_s)
    eps = (x_t - a_t * x0) / s_t  # the student's eps, consistent with its x0 (a DDIM step)
    assert torch.allclose(a_s * x0 + s_s * eps, x_s, atol=1e-5)  # the DDIM update x_s = alpha_s x0 + sigma_s eps


def test_target_matches_the_released_codes_vp_form():
    """The authors' code writes the target with log-SNRs: alpha = sqrt(sigmoid(l)), sigma_s / sigma_t =
    exp((softplus(l_t) - softplus(l_s)) / 2) (re-typed from google-research/diffusion_distillation's training
    loss); on a VP path it is the same number."""
    g = torch.Generator().manual_seed(1)
    z_t, z_s = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    l_t = torch.linspace(-6, 2, 6, dtype=torch.float64)[:, None]
    l_s = l_t + 1.5
    alpha = lambda ell: torch.sigmoid(ell).sqrt()  # noqa: E731
    sigma = lambda ell: torch.sigmoid(-ell).sqrt()  # noqa: E731
    stdv_frac = torch.exp(0.5 * (F.softplus(l_t) - F.softplus(l_s)))
    reference = (z_s - stdv_frac * z_t) / (alpha(l_s) - stdv_frac * alpha(l_t))
    ours = progressive_target(z_t, z_s, alpha(l_t), sigma(l_t), alpha(l_s), sigma(l_s))
    assert torch.allclose(ours, reference, rtol=1e-10, atol=1e-12)


def test_to_a_clean_end_the_target_is_the_teachers_output():
    x_t, x_s = torch.randn(2, 3, 4)
    one, zero = torch.ones(1), torch.zeros(1)
    assert torch.equal(progressive_target(x_t, x_s, torch.tensor([0.3]), torch.tensor([0.9]), one, zero), x_s)


def test_truncated_snr_weight_is_the_max_of_the_x_and_eps_losses():
    """Their loss max(x_mse, eps_mse) at fixed z_t: the eps error is -alpha / sigma times the x error."""
    alpha = torch.tensor([0.05, 0.5, 0.7071, 0.9, 0.999])
    sigma = (1 - alpha**2).sqrt()
    x_err = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    x_mse = (x_err**2).mean(1)
    eps_mse = ((alpha[:, None] / sigma[:, None] * x_err) ** 2).mean(1)
    assert torch.allclose(truncated_snr_weight(alpha, sigma) * x_mse, torch.maximum(x_mse, eps_mse), rtol=1e-5)


@pytest.mark.parametrize(
    "process", [FlowProcess(t_min=0), FlowProcess(t_min=0, sampling_shift=0.33), VPProcess("cosine", 1000)]
)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_halving_grid_holds_the_students_grid_at_every_other_time(process, n):
    grid = halving_grid(process, n)
    assert grid.shape == (2 * n + 1,)
    assert torch.allclose(grid[::2], process.sampling_times(n).double())


@pytest.mark.parametrize(
    "process,hint",
    [(FlowProcess(), "flow: set process.t_min=0"), (EDMProcess(), "edm's grid does not halve")],
)
def test_a_grid_that_does_not_nest_is_refused_in_one_line(process, hint):
    with pytest.raises(ValueError, match=f"nested sampling grids.*{hint}"):
        halving_grid(process, 2)


def test_flow_with_t_min_0_samples_evenly_to_clean_data():
    grid = FlowProcess(t_min=0).sampling_times(4)
    assert torch.allclose(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------- the method on a real module
def _student(process_name="flow"):
    """A tiny module (tests/test_guidance_methods.py's) on a grid that halves (flow: t_min = 0)."""
    module = _module(process_name)
    if process_name == "flow":
        module.diffusion.process.t_min = 0.0
    return module


def _method(module, teacher_steps=8, student_steps=2, guidance=None):
    method = ProgressiveDistillation("in-memory", teacher_steps, student_steps, 3, teacher_guidance=guidance)
    from difflab.utils.frozen import Frozen

    method._teacher = Frozen(module)  # the module teaches itself: its steps are the repo's sampler's
    return method


@pytest.mark.parametrize("process_name", ["flow", "vp"])
def test_the_teachers_pairs_of_steps_are_the_repos_guided_ddim_sampler(process_name):
    module = _student(process_name)
    d = module.diffusion
    labels = torch.tensor([0, 1, 2, 0])
    method = _method(module, 8, 2)
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(5)) * d.process.prior_std
    n = method.steps_in_round(0)  # 4 student steps from a teacher of 8
    grid = sampling_grid(d.process, 2 * n)
    x = noise
    for i in range(n):
        x = method.teacher_two_steps(x, labels, torch.full((4,), i), grid)
    fn = d.guided_fn(module, labels)  # the module's own CFG 2
    want = ddim(fn, noise, d.process, steps=2 * n)
    assert torch.allclose(x, want, atol=1e-5)


def test_a_perfect_student_samples_the_teachers_2n_steps_in_n():
    """A student that predicts the target everywhere, sampled by the repo's DDIM at N steps, ends where the guided
    teacher's 2 N-step DDIM ends."""
    module = _student("flow")
    d = module.diffusion
    labels = torch.tensor([0, 1, 2, 0])
    method = _method(module, 4, 1)
    n = method.steps_in_round(0)  # 2
    grid = sampling_grid(d.process, 2 * n)
    times = [g[0] for g in grid]

    def student(x, t):
        i = min(range(len(times)), key=lambda k: abs(times[k] - t)) // 2
        (_, a_t, s_t), (_, a_s, s_s) = grid[2 * i], grid[2 * i + 2]
        x_s = method.teacher_two_steps(x, labels, torch.full((x.shape[0],), i), grid)
        x0 = progressive_target(x, x_s, *(torch.tensor(v) for v in (a_t, s_t, a_s, s_s)))
        return x0, (x - a_t * x0) / s_t

    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(6))
    got = ddim(student, noise, d.process, steps=n)
    want = ddim(d.guided_fn(module, labels), noise, d.process, steps=2 * n)
    assert torch.allclose(got, want, atol=1e-5)


def test_mixed_student_steps_in_one_batch_are_each_their_own_two_teacher_steps():
    module = _student("flow")
    method = _method(module, 8, 2)
    grid = sampling_grid(module.diffusion.process, 8)
    x_t = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    labels, index = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([3, 0, 3, 1, 2, 0])
    together = method.teacher_two_steps(x_t, labels, index, grid)
    for row in range(6):
        alone = method.teacher_two_steps(x_t[row : row + 1], labels[row : row + 1], index[row : row + 1], grid)
        assert torch.allclose(together[row : row + 1], alone, atol=1e-6), row


def test_only_the_first_rounds_teacher_is_guided():
    """From round 1 the teacher is a student that learned guided steps: guiding it again would compound the scale."""
    module = _student("flow")
    d = module.diffusion
    method = _method(module, 8, 1)  # the module's own guidance (CFG 2) guides round 0
    labels = torch.tensor([0, 1, 2, 0])
    x_t = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(8))
    index = torch.zeros(4, dtype=torch.long)
    grid = sampling_grid(d.process, 2 * method.steps_in_round(1))
    method.round = 1
    unguided = method.teacher_two_steps(x_t, labels, index, grid)
    plain = d.guided_fn(module, labels, guidance={"scale": 1.0})
    want = x_t
    for (t, _, _), (_, a, s) in zip(grid[:2], grid[1:3]):
        x0, eps = plain(want, t)
        want = a * x0 + s * eps
    assert torch.allclose(unguided, want, atol=1e-6)
    method.round = 0
    assert not torch.allclose(method.teacher_two_steps(x_t, labels, index, grid), want, atol=1e-3)


def test_the_loss_is_the_truncated_snr_weighted_x0_error_to_the_target():
    module = _student("flow")
    method = _method(module, 4, 1)
    d = module.diffusion
    batch = {"x": torch.rand(6, 1, 4, 4) * 2 - 1, "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    torch.manual_seed(0)
    loss = method.loss(module, batch)
    # the same draws by hand: a student step index per sample, then the noise
    torch.manual_seed(0)
    index = torch.randint(2, (6,))
    times = halving_grid(d.process, 2)
    alphas, sigmas = d.process.coefficients(times)
    col = lambda v: v.float().view(-1, 1, 1, 1)  # noqa: E731
    a_t, s_t, a_s, s_s = (
        col(alphas[2 * index]),
        col(sigmas[2 * index]),
        col(alphas[2 * index + 2]),
        col(sigmas[2 * index + 2]),
    )
    x_t = a_t * batch["x"] + s_t * torch.randn_like(batch["x"])
    grid = list(zip(times.tolist(), alphas.tolist(), sigmas.tolist()))
    x_s = method.teacher_two_steps(x_t, batch["label"], index, grid)
    target = progressive_target(x_t, x_s, a_t, s_t, a_s, s_s)
    t = times[2 * index].float()
    cond = d.condition(batch["label"])
    out = module(x_t, d.process.net_time(t), cond["vector"], cond["context"], cond["context_mask"])
    da, ds = (col(v) for v in d.process.derivatives(t.double()))
    x0_hat = (ds * x_t - s_t * out) / (a_t * ds - s_t * da)  # the velocity's x0 on the path
    want = (torch.clamp((a_t / s_t) ** 2, min=1).flatten() * ((x0_hat - target) ** 2).mean((1, 2, 3))).mean()
    assert loss > 0 and torch.allclose(loss, want, rtol=1e-4)


@pytest.mark.parametrize(
    "teacher,student,message",
    [(16, 3, "power of two"), (4, 4, "power of two"), (6, 2, "power of two"), (4, 0, "power of two")],
)
def test_step_counts_a_round_cannot_halve_are_refused(teacher, student, message):
    with pytest.raises(ConfigError, match=message):
        ProgressiveDistillation("t.ckpt", teacher, student)


def test_a_method_without_a_teacher_is_refused():
    with pytest.raises(ConfigError, match="needs method.teacher_ckpt"):
        ProgressiveDistillation(None)


def test_the_student_must_sample_with_ddim_at_its_step_count():
    method = ProgressiveDistillation("t.ckpt", 8, 2)
    with pytest.raises(ValueError, match="sampler=ddim sampler.steps=2"):
        method.check(FlowProcess(t_min=0), functools.partial(ddim, steps=4))
    with pytest.raises(ValueError, match="deterministic.*sampler.eta=0"):
        method.check(FlowProcess(t_min=0), functools.partial(ddim, steps=2, eta=1.0))
    method.check(FlowProcess(t_min=0), functools.partial(ddim, steps=2))
    method.check(FlowProcess(t_min=0), functools.partial(ddim, steps=2, spacing=0.5))  # another shift nests too
    with pytest.raises(ValueError, match="nested sampling grids"):  # the sampler's spacing is the grid's
        method.check(VPProcess("cosine", 1000), functools.partial(ddim, steps=2, spacing="leading"))


# ---------------------------------------------------------------- a real run
DISTIL = [
    "method=progressive",
    "method.teacher_steps=8",
    "method.student_steps=2",
    "method.steps_per_round=2",
    "process.t_min=0",
]


@pytest.fixture(scope="module")
def teacher_ckpt(run_dir):
    return run_dir / "checkpoints" / "last.ckpt"


def _tiny(**kw):
    """The tiny run's overrides, the student's sampler steps left to the method (sampler.steps: student_steps)."""
    return [a for a in tiny_overrides(**kw) if not a.startswith("sampler.steps")]


def _distil(tmp, teacher, *extra, max_steps=4):
    import train

    return run_hydra_main(
        train.main,
        [
            *_tiny(max_steps=max_steps),
            *DISTIL,
            f"method.teacher_ckpt={teacher}",
            "logger=csv",
            f"hydra.run.dir={tmp}",
            *extra,
        ],
    )


def test_distillation_runs_its_rounds_and_resumes_exactly(teacher_ckpt, tmp_path):
    from difflab.checkpoints import load_checkpoint
    from difflab.diffusion.system import load_for_sampling

    assert _distil(tmp_path / "run", teacher_ckpt) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    final, mid = load_checkpoint(ckpts / "step_0000004.ckpt"), load_checkpoint(ckpts / "step_0000002.ckpt")
    assert mid["difflab_method"] == {"round": 0, "teacher": None}  # round 1's teacher is the file
    state = final["difflab_method"]
    assert state["round"] == 1 and state["teacher"] is not None  # round 2's teacher: round 1's student at step 2
    for k, v in state["teacher"].items():
        assert torch.equal(v, mid["current_model_state"][k] if "current_model_state" in mid else mid["state_dict"][k])
    # resumed from step 2, the run ends where the uninterrupted one did (weights and the method's teacher)
    assert _distil(tmp_path / "resumed", teacher_ckpt, f"ckpt_path={ckpts / 'step_0000002.ckpt'}") == 0
    again = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_0000004.ckpt")
    for k, v in final["state_dict"].items():
        assert torch.allclose(v, again["state_dict"][k], atol=1e-6), k
    for k, v in state["teacher"].items():
        assert torch.equal(v, again["difflab_method"]["teacher"][k]), k
    # the student is an ordinary checkpoint: it samples with its 2-step DDIM, unguided
    diffusion, net = load_for_sampling(ckpts / "last.ckpt")
    assert diffusion.describe_sampler().startswith("ddim-2 ") and diffusion.guidance.scale == 1.0
    out = diffusion.sample(net, 4)
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()


def test_a_resume_with_other_rounds_is_refused_in_one_line_writing_nothing(teacher_ckpt, tmp_path, capsys):
    """The saved round counts in the checkpoint run's rounds: resuming it in place with another round length (or step
    counts, as a changed experiment default would) stops before Hydra rewrites the run's files, not after."""
    run = tmp_path / "run"
    assert _distil(run, teacher_ckpt) == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    import train

    argv = [*_tiny(max_steps=6), *(a for a in DISTIL if not a.startswith("method.steps_per_round")), "logger=csv"]
    argv += [f"method.teacher_ckpt={teacher_ckpt}", "method.steps_per_round=3", f"hydra.run.dir={run}"]
    code = run_hydra_main(train.main, [*argv, "ckpt_path=last"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith(
        f"error: resuming {run / 'checkpoints' / 'last.ckpt'}: its run trained with method.steps_per_round=2 and "
        "this run has method.steps_per_round=3 ("
    ), lines
    assert lines[-1].endswith("resume with method.steps_per_round=2, or start a new run (init_from= keeps the weights)")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # .hydra/, logs, checkpoints untouched


def test_a_resume_with_other_listed_round_lengths_is_refused_and_the_same_ones_resume(teacher_ckpt, tmp_path, capsys):
    import train

    run = tmp_path / "run"
    argv = [*_tiny(), *(a for a in DISTIL if not a.startswith("method.steps_per_round")), "logger=csv"]
    argv += [f"method.teacher_ckpt={teacher_ckpt}", f"hydra.run.dir={run}"]
    assert run_hydra_main(train.main, [*argv, "method.steps_per_round=[1,3]"]) == 0
    capsys.readouterr()
    code = run_hydra_main(train.main, [*argv, "method.steps_per_round=[3,1]", "trainer.max_steps=6", "ckpt_path=last"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "its run trained with method.steps_per_round=[1, 3]" in line, line
    assert line.endswith("resume with method.steps_per_round=[1,3], or start a new run (init_from= keeps the weights)")
    code = run_hydra_main(train.main, [*argv, "method.steps_per_round=[1,3]", "trainer.max_steps=6", "ckpt_path=last"])
    assert code == 0 and (run / "checkpoints" / "step_0000006.ckpt").exists()


def test_linear_restarts_decays_the_rate_over_each_round_and_restarts_it(teacher_ckpt, tmp_path):
    """``lr_schedule=linear_restarts`` takes its period from the method's rounds: with rounds of 2 steps the rate
    is the peak at each round's first step and half of it at its second (the checkpoint after step k holds the rate
    of step k + 1)."""
    import train
    from difflab.checkpoints import load_checkpoint

    argv = [*_tiny(max_steps=4, save_every=1), *DISTIL, f"method.teacher_ckpt={teacher_ckpt}", "logger=csv"]
    argv += ["lr_schedule=linear_restarts", "model.lr=0.01"]
    assert run_hydra_main(train.main, [*argv, f"hydra.run.dir={tmp_path / 'run'}"]) == 0

    def rates(run: str, steps) -> list[float]:
        ckpts = [load_checkpoint(tmp_path / run / "checkpoints" / f"step_{k:07d}.ckpt") for k in steps]
        return [c["optimizer_states"][0]["param_groups"][0]["lr"] for c in ckpts]

    assert rates("run", (1, 2, 3, 4)) == pytest.approx([0.005, 0.01, 0.005, 0.01])
    # resumed mid-round, the rates go on as in the uninterrupted run
    resume = [*argv, f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'step_0000001.ckpt'}"]
    assert run_hydra_main(train.main, [*resume, f"hydra.run.dir={tmp_path / 'resumed'}"]) == 0
    assert rates("resumed", (2, 3, 4)) == pytest.approx([0.01, 0.005, 0.01])


def test_rounds_of_their_own_lengths_pass_the_teacher_and_restart_the_rate_at_each_listed_end(teacher_ckpt, tmp_path):
    """``method.steps_per_round=[1, 3]``: round 1 starts at step 1 with round 0's student as its teacher, and
    ``linear_restarts`` (its period the same list) decays over 1 step, then over 3, then restarts at the peak."""
    import train
    from difflab.checkpoints import load_checkpoint

    argv = [*_tiny(max_steps=4, save_every=1), *(a for a in DISTIL if not a.startswith("method.steps_per_round"))]
    argv += [f"method.teacher_ckpt={teacher_ckpt}", "method.steps_per_round=[1,3]", "logger=csv"]
    argv += ["lr_schedule=linear_restarts", "model.lr=0.01", f"hydra.run.dir={tmp_path / 'run'}"]
    assert run_hydra_main(train.main, argv) == 0
    ckpts = [load_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{k:07d}.ckpt") for k in (1, 2, 3, 4)]
    assert [c["difflab_method"]["round"] for c in ckpts] == [0, 1, 1, 1]
    for k, v in ckpts[-1]["difflab_method"]["teacher"].items():  # round 1's teacher: the student after step 1
        assert torch.equal(v, ckpts[0]["state_dict"][k]), k
    rates = [c["optimizer_states"][0]["param_groups"][0]["lr"] for c in ckpts]  # the rate of the next step
    assert rates == pytest.approx([0.01, 0.01 * 2 / 3, 0.01 / 3, 0.01])


STUDENTS = {  # every distillation method starts its student as the teacher (methods.teacher.adopt_teacher)
    "progressive": DISTIL,
    "reflow": ["method=reflow", "process.t_min=0"],
    "consistency": ["method=consistency", "process.t_min=0"],
    "scm": ["method=scm", "process.t_min=0"],
}


@pytest.mark.parametrize("method", sorted(STUDENTS))
def test_the_student_starts_as_the_teacher(teacher_ckpt, tmp_path, method):
    from hydra.utils import instantiate

    from difflab.checkpoints import load_weights
    from difflab.lit_modules.diffusion_module import DiffusionModule
    from difflab.pipeline import fill_from_datamodule

    cfg = compose_train(tmp_path, [*_tiny(), *STUDENTS[method], f"method.teacher_ckpt={teacher_ckpt}"])
    fill_from_datamodule(cfg, instantiate(cfg.datamodule))
    module: DiffusionModule = instantiate(cfg.model)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.setup("fit")
    teacher = load_weights(teacher_ckpt)["ema"]
    assert any(not torch.equal(before[k], teacher[k]) for k in before)  # a fresh network is not the teacher
    for k, v in module.state_dict().items():
        assert torch.equal(v, teacher[k]), k


# ---------------------------------------------------------------- refusals before anything is written
def _problems(tmp_path, *overrides):
    cfg = compose_train(tmp_path, [*_tiny(), *overrides])
    return check_config(cfg, "train")


def test_preflight_refuses_a_missing_teacher(tmp_path):
    problems = _problems(tmp_path, "method=progressive", "method.steps_per_round=1")
    assert problems and "needs method.teacher_ckpt" in problems[0]


def test_preflight_refuses_a_teacher_of_another_network(teacher_ckpt, tmp_path):
    problems = _problems(tmp_path, *DISTIL, f"method.teacher_ckpt={teacher_ckpt}", "model.net.base_channels=16")
    assert problems and "model.net.base_channels=8 where this run has 16" in problems[0], problems


def test_a_teacher_saved_before_a_network_option_existed_still_teaches(teacher_ckpt, tmp_path):
    """A stored config without a newer model.net key (interval_input) means the constructor's default: the same
    network as a run that sets it to its default; a run that changes it is refused."""
    from difflab.checkpoints import load_checkpoint

    ckpt = load_checkpoint(teacher_ckpt)
    assert "interval_input" not in ckpt["difflab"]["config"]["model"]["net"]
    older = tmp_path / "older.ckpt"
    torch.save(ckpt, older)
    assert _problems(tmp_path, *DISTIL, f"method.teacher_ckpt={older}", "+model.net.interval_input=false") == []
    problems = _problems(tmp_path, *DISTIL, f"method.teacher_ckpt={older}", "+model.net.interval_input=true")
    assert problems and "model.net.interval_input=False where this run has True" in problems[0], problems


def test_preflight_refuses_a_budget_that_ends_before_the_last_round(teacher_ckpt, tmp_path):
    problems = _problems(tmp_path, *DISTIL, f"method.teacher_ckpt={teacher_ckpt}", "trainer.max_steps=2")
    assert problems and problems[0].startswith("trainer.max_steps=2 is invalid: at least 3"), problems


def test_preflight_refuses_a_student_sampler_of_another_step_count(teacher_ckpt, tmp_path):
    problems = _problems(tmp_path, *DISTIL, f"method.teacher_ckpt={teacher_ckpt}", "sampler.steps=4")
    assert problems and "sampler.steps=2" in problems[0], problems


def test_a_good_distillation_config_passes(teacher_ckpt, tmp_path):
    assert _problems(tmp_path, *DISTIL, f"method.teacher_ckpt={teacher_ckpt}") == []


def test_console_command_refuses_a_teacher_of_another_network_writing_nothing(teacher_ckpt, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    env.pop("DIFFLAB_ROOT", None)
    proc = subprocess.run(
        [
            *_command("difflab-train"),
            *_tiny(),
            *DISTIL,
            f"method.teacher_ckpt={teacher_ckpt}",
            "model.net.base_channels=16",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: method.teacher_ckpt="), proc.stderr
    assert "base_channels" in lines[0]
    assert list(work.iterdir()) == []  # nothing written


@pytest.mark.parametrize("value", [[0, 160], [], True, [160.0, 160], "160", [True, 2]])
def test_round_gcd_hands_back_what_is_not_a_list_of_lengths(value):
    """Only a list of positive integers has a gcd; anything else comes back unchanged for round_lengths to name."""
    assert round_gcd(value) == value and type(round_gcd(value)) is type(value)


def test_rounds_count(tmp_path):
    assert ProgressiveDistillation("t", 16, 1).rounds == 4 and ProgressiveDistillation("t", 8, 2).rounds == 2
    assert [ProgressiveDistillation("t", 16, 1).steps_in_round(r) for r in range(4)] == [8, 4, 2, 1]
    # the one count the pre-flight checks and the bench read as well: log2 of the step ratio
    assert [round_count(t, s) for t, s in ((32, 1), (16, 2), (2, 1), (8, 8), (64, 4))] == [5, 3, 1, 0, 4]
    assert [round_gcd(v) for v in (320, [160, 160, 320, 480, 480], [100, 150], [7])] == [320, 160, 50, 7]


@pytest.mark.parametrize(
    ("max_steps", "said"),
    [
        (1600, None),
        (-1, None),  # no step bound (a max_time run)
        (None, None),
        (1440, "training stops in round 5 after 160 of its 320 steps"),
        (1281, "training stops in round 5 after 1 of its 320 steps"),
        # the schema refuses these two in a run (rounds_fit_the_budget); the method still says them right
        (1000, "training stops in round 4 after 360 of its 640 steps; round 5 never starts"),
        (640, "training stops as round 3 ends; rounds 4-5 never start"),
        (2000, "the last round's student trains 400 steps past the rounds' 1600"),
    ],
)
def test_a_step_budget_other_than_the_rounds_total_is_said_in_words(max_steps, said, caplog):
    """A budget that cuts the last round (the schema refuses only one that never starts it) or outlasts the rounds is
    not an error, but the run says so once at setup, naming the total that runs every round in full."""
    lengths = [160, 160, 320, 640, 320]
    assert budget_mismatch(lengths, max_steps) == said
    with caplog.at_level("WARNING", logger="difflab.methods.progressive"):
        assert ProgressiveDistillation("t", 32, 1, lengths).warn_if_budget_differs(max_steps) == said
    warned = _progressive_warnings(caplog)
    assert len(warned) == (said is not None), warned
    if said is not None:
        assert warned[0].startswith(f"method=progressive: trainer.max_steps={max_steps} but the rounds "), warned[0]
        assert f"add up to 1600: {said} (trainer.max_steps=1600 runs every round in full and stops)" in warned[0]


def _progressive_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "difflab.methods.progressive"]


def test_setup_says_a_budget_that_outlasts_the_rounds(monkeypatch, caplog):
    """The warning comes from the run's own trainer at setup for fit, and a module without a trainer says nothing."""
    from types import SimpleNamespace

    import difflab.methods.progressive as progressive
    from difflab.utils.frozen import Frozen

    module = _student("flow")
    module.diffusion.sampler = functools.partial(ddim, steps=2)
    monkeypatch.setattr(progressive, "adopt_teacher_of", lambda m, *a: Frozen(m))  # no file to read
    with caplog.at_level("WARNING", logger="difflab.methods.progressive"):
        ProgressiveDistillation("in-memory", 8, 2, 3).setup(module, "fit")  # no trainer: nothing to compare
        assert _progressive_warnings(caplog) == []
        module._trainer = SimpleNamespace(max_steps=7)
        ProgressiveDistillation("in-memory", 8, 2, 3).setup(module, "validate")  # only before training
        assert _progressive_warnings(caplog) == []
        ProgressiveDistillation("in-memory", 8, 2, 3).setup(module, "fit")
    assert _progressive_warnings(caplog) == [
        "method=progressive: trainer.max_steps=7 but the rounds (method.steps_per_round=3) add up to 6: the last round's "
        "student trains 1 step past the rounds' 6 (trainer.max_steps=6 runs every round in full and stops)"
    ]


def test_each_round_starts_after_the_lengths_listed_before_it():
    method = ProgressiveDistillation("t", 32, 1, [160, 160, 320, 480, 480])
    steps = (0, 159, 160, 319, 320, 639, 640, 1119, 1120, 1599, 1600, 5000)
    assert [method.round_at(s) for s in steps] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4]
    assert [ProgressiveDistillation("t", 16, 1, 5).round_at(s) for s in (0, 4, 5, 14, 15, 99)] == [0, 0, 1, 2, 3, 3]


@pytest.mark.parametrize(
    ("lengths", "shown"), [([160, 160, 320, 480], "[160, 160, 320, 480]"), ([160, 0, 1, 1, 1], "[160, 0, 1, 1, 1]")]
)
def test_round_lengths_that_are_not_one_per_round_are_refused(lengths, shown):
    with pytest.raises(ConfigError, match=rf"^method.steps_per_round={re.escape(shown)} is invalid: .* a list of 5"):
        ProgressiveDistillation("t", 32, 1, lengths)


def test_listed_rounds_name_the_intervals_to_set_and_their_budget(tmp_path):
    """A cadence key that interpolates method.steps_per_round itself becomes a list with listed rounds: refused in one
    line naming the keys and the step count that ends every round (the lengths' gcd); experiment=digits_progressive
    takes that gcd itself and passes; the budget must reach the last round."""
    base = ["experiment=digits_progressive", "method.steps_per_round=[160,160,320,480,480]"]
    echo = [f"{k}='${{method.steps_per_round}}'" for k in ROUND_INTERVALS[:2]]
    problems = check_config(compose_train(tmp_path / "a", [*base, *echo]), "train")
    assert problems == [
        "method.steps_per_round=[160, 160, 320, 480, 480] is invalid: rounds of their own lengths need "
        "trainer.val_check_interval, callbacks.class_grid.every_n_steps as one step count that ends every round: "
        "set trainer.val_check_interval=160 callbacks.class_grid.every_n_steps=160 (the lengths' greatest common "
        "divisor; '${round_gcd:${method.steps_per_round}}' computes it)"
    ], problems
    problems = check_config(compose_train(tmp_path / "b", base), "train")
    assert len(problems) == 1 and problems[0].startswith("method=progressive needs method.teacher_ckpt"), problems
    four = check_config(compose_train(tmp_path / "d", [*base[:1], "method.steps_per_round=[160,160,320,480]"]), "train")
    assert four == [  # a list of the wrong length: its own fault, not the keys that echo it
        "method.steps_per_round=[160, 160, 320, 480] is invalid: an integer >= 1 (every round's optimizer steps) or a "
        "list of 5, one per round (5 rounds halve the teacher's DDIM steps to the student's)"
    ]
    coprime = check_config(
        compose_train(tmp_path / "e", [*base[:1], "method.steps_per_round=[160,160,320,480,479]"]), "train"
    )
    assert coprime == [  # gcd 1: a checkpoint every step
        "method.steps_per_round=[160, 160, 320, 480, 479] is invalid: lengths whose greatest common divisor is 1 run "
        "trainer.val_check_interval, callbacks.class_grid.every_n_steps, callbacks.model_checkpoint.every_n_train_steps"
        " every 1 steps (1599 times): give lengths sharing a larger divisor (at most 4 per round on average)"
    ], coprime
    short = check_config(compose_train(tmp_path / "c", [*base, "trainer.max_steps=1120"]), "train")
    assert short == [
        "trainer.max_steps=1120 is invalid: at least 1121 for method=ProgressiveDistillation (5 rounds of "
        "method.steps_per_round=[160, 160, 320, 480, 480]: 1600 runs every round in full)"
    ]


def test_the_experiment_budgets_its_rounds_and_keeps_each_rounds_student(tmp_path):
    """experiment=digits_progressive: its step budget is its rounds, and the checkpoint, validation and class grid
    land on every round's end, also when a user changes the round length, lists one per round (their gcd) or changes
    the step counts (so the number of rounds): training stops as the last round ends."""
    cfg = compose_train(tmp_path, ["experiment=digits_progressive", "method.teacher_ckpt=t.ckpt"])
    method = ProgressiveDistillation(
        cfg.method.teacher_ckpt, cfg.method.teacher_steps, cfg.method.student_steps, cfg.method.steps_per_round
    )
    assert cfg.trainer.max_steps == method.round_ends[-1] == 1600
    cases = (
        (["method.steps_per_round=320"], 320, 1600),
        (["method.steps_per_round=96"], 96, 480),
        (["method.steps_per_round=[96,96,192,288,288]"], 96, 960),
        (["method.steps_per_round=[100,150,200,250,300]"], 50, 1000),
        (["method.steps_per_round=[200,200,400,600,600]"], 200, 2000),  # 1600 would have cut the last round short
        (["method.steps_per_round=100", "method.teacher_steps=16", "method.student_steps=2"], 100, 300),
    )
    for i, (overrides, every, total) in enumerate(cases):
        c = compose_train(tmp_path / str(i), ["experiment=digits_progressive", *overrides])
        cadences = (c.callbacks.model_checkpoint.every_n_train_steps, c.trainer.val_check_interval)
        assert cadences == (every, every) and c.callbacks.class_grid.every_n_steps == every, (overrides, cadences)
        assert c.trainer.max_steps == total, overrides


@pytest.mark.parametrize(
    "lengths,teacher,student",
    [(0, 32, 1), ("160", 32, 1), ([160, 0], 32, 1), ([], 32, 1), (160, 0, 1), (160, 32, True), (160, 32, 32)],
)
def test_round_total_hands_back_what_makes_no_budget(lengths, teacher, student):
    """A length of 0 or text, a list with a bad or no length, step counts that are not counts or make no round: the
    value comes back unchanged (the method's check names it; the budget is no second mistake)."""
    assert round_total(lengths, teacher, student) == lengths


def test_round_total_is_every_rounds_steps():
    """One length times the rounds the step counts make; listed lengths add up whatever the step counts (a list of
    the wrong length is the method's to name, not the budget's)."""
    assert [round_total(100, t, s) for t, s in ((32, 1), (16, 2), (2, 1), (64, 4))] == [500, 300, 100, 400]
    assert round_total([160, 160, 320, 480, 480], 32, 1) == 1600 and round_total([3, 4], 32, 0) == 7


@pytest.mark.parametrize("bad", ["method.teacher_steps=0", "method.student_steps=0", "method.teacher_steps=32.5"])
def test_a_bad_step_count_is_one_line_not_a_budget_line_too(bad, tmp_path):
    """The budget computed from a bad step count reports nothing of its own: the step count's line is the only one."""
    cfg = compose_train(tmp_path, ["experiment=digits_progressive", "method.teacher_ckpt=t.ckpt", bad])
    problems = [p for p in check_config(cfg, "train") if not p.startswith("method.teacher_ckpt=")]  # t.ckpt: absent
    assert len(problems) == 1 and problems[0].startswith(bad.split("=")[0]), problems


def test_the_listed_rounds_keep_each_rounds_student_and_decay_over_each_round(tmp_path):
    """experiment=digits_progressive's listed rounds: its budget is their total, every round ends on a checkpoint,
    validation and class grid, and the rate decays over each listed round."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_train(tmp_path, ["experiment=digits_progressive", "method.teacher_ckpt=t.ckpt"])
    method = instantiate(cfg.method)
    assert method.round_lengths == (160, 160, 320, 640, 320) and cfg.trainer.max_steps == sum(method.round_lengths)
    for key in ROUND_INTERVALS:
        every = OmegaConf.select(cfg, key)
        assert all(end % every == 0 for end in method.round_ends), key
    assert instantiate(cfg.lr_schedule).period == method.round_lengths
    assert check_config(cfg, "train")[0].startswith("method.teacher_ckpt=t.ckpt")  # only the teacher is missing


def test_preflight_refuses_init_from_and_fsdp_with_a_teacher(teacher_ckpt, tmp_path):
    distil = [*DISTIL, f"method.teacher_ckpt={teacher_ckpt}"]
    problems = _problems(tmp_path, *distil, f"init_from={teacher_ckpt}")
    assert problems and problems[0].startswith("init_from=") and "starts as method.teacher_ckpt" in problems[0]
    problems = _problems(tmp_path, *distil, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2")
    assert any("not FSDP" in p for p in problems), problems


def test_preflight_refuses_a_teacher_of_another_schedule_or_image_size(teacher_ckpt, tmp_path):
    distil = [*DISTIL, f"method.teacher_ckpt={teacher_ckpt}"]
    problems = _problems(tmp_path, *distil, "process.shift=3")
    assert problems and "model.diffusion.process.shift=1.0 where this run has 3" in problems[0], problems
    problems = _problems(tmp_path, *distil, "datamodule.image_size=16")
    assert problems and "datamodule.image_size=8 where this run has 16" in problems[0], problems


@pytest.mark.parametrize("guidance", ["apg", "autoguidance_kept", "cfgpp"])
def test_the_teachers_guidance_comes_from_the_group_and_the_student_samples_unguided(guidance, tmp_path):
    from hydra.utils import instantiate

    cfg = compose_train(tmp_path, [*_tiny(), *DISTIL, "method.teacher_ckpt=t.ckpt", f"guidance={guidance}"])
    student = instantiate(cfg.model.diffusion.guidance)
    teacher = instantiate(cfg.model.method.teacher_guidance)
    assert type(student).__name__ == "CFG" and student.scale == 1.0 and student.interval is None
    assert teacher.name == {"apg": "apg", "autoguidance_kept": "autoguidance", "cfgpp": "cfgpp"}[guidance]
    assert cfg.model.diffusion.objective.x0_clip == "none"  # the student learns the teacher's steps unclipped
