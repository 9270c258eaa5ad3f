"""Optimizers and LR schedules as config groups: Muon's split, the budget the schedule decays over, and each
group option building an optimizer the module trains with."""

from __future__ import annotations

import copy
import math
import re
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from difflab.optim.lr_schedules import (
    LinearRestarts,
    WarmupCosine,
    budget_progress,
    warmup_cosine,
    warmup_cosine_progress,
)
from difflab.optim.muon import MuonAdamW
from difflab.utils.errors import ConfigError
from tests.helpers import CONFIG_DIR


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.GroupNorm(2, 4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 8),
        torch.nn.Linear(8, 3),
    )


def _steps(net, opt, n: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(5, 1, 8, 8, generator=g)
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()


def test_muon_takes_the_matrices_and_adamw_the_rest_exactly_as_the_two_torch_optimizers():
    a, b = _net(), _net()
    combined = MuonAdamW(a.parameters(), lr=0.01, weight_decay=0.1)
    matrices = [p for p in b.parameters() if p.ndim == 2]
    rest = [p for p in b.parameters() if p.ndim != 2]
    assert len(matrices) == 2 and len(rest) == 6  # two Linear weights; conv kernel, biases, norm gains
    muon = torch.optim.Muon(matrices, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=0.01, weight_decay=0.1)
    _steps(a, combined, 3)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(5, 1, 8, 8, generator=g)
        muon.zero_grad(), adamw.zero_grad()
        b(x).pow(2).mean().backward()
        muon.step(), adamw.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_muon_state_round_trips_and_an_lr_schedule_scales_both_halves():
    a = _net()
    opt = MuonAdamW(a.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    _steps(a, opt, 2)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.005, 0.005]
    assert opt.muon.param_groups[0]["lr"] == opt.adamw.param_groups[0]["lr"] == 0.005
    b = copy.deepcopy(a)
    resumed = MuonAdamW(b.parameters(), lr=0.01)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert len(resumed.state) == len(opt.state) == 8
    _steps(a, opt, 2, seed=5)
    _steps(b, resumed, 2, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_muon_refuses_a_network_without_matrices():
    with pytest.raises(ValueError, match="no 2-D weight"):
        MuonAdamW(torch.nn.Conv2d(1, 1, 3).parameters())


def _trainer(total_steps: float, time_used: float | None):
    """A stand-in trainer: its step budget and, when given, a Timer whose budget is time_used parts spent."""
    from lightning.pytorch.callbacks import Timer

    callbacks = []
    if time_used is not None:
        timer = Timer(duration={"seconds": 100})
        timer.time_elapsed = lambda stage="train": 100.0 * time_used
        timer.time_remaining = lambda stage="train": 100.0 * (1 - time_used)
        callbacks.append(timer)
    return SimpleNamespace(estimated_stepping_batches=total_steps, callbacks=callbacks)


def test_budget_progress_is_the_bound_further_along():
    assert budget_progress(50, 100, None) == 0.5
    assert budget_progress(50, 100, lambda: 0.8) == 0.8  # the time budget runs out first
    assert budget_progress(90, 100, lambda: 0.2) == 0.9  # the step budget runs out first
    assert budget_progress(50, None, lambda: 0.3) == 0.3


@pytest.mark.parametrize("time_used", [None, 0.05, 0.9])
def test_warmup_cosine_follows_whichever_budget_runs_out_first(time_used):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    entry = WarmupCosine(warmup=0.1, final_fraction=0.1)(opt, _trainer(1000, time_used))
    factor = entry["scheduler"].lr_lambdas[0]
    assert entry["interval"] == "step"
    for step in (0, 50, 400, 999):
        progress = max(step / 1000, time_used or 0.0)
        expected = (
            warmup_cosine(step, 100, 1000, 0.01, 0.1)
            if time_used is None
            else warmup_cosine_progress(progress, 0.1, 0.01, 0.1)
        )
        assert math.isclose(factor(step), expected, rel_tol=1e-12), (step, time_used)
    if time_used == 0.9:  # 90% of the time is gone at step 400: the rate is near its end value, not its peak
        assert factor(400) < 0.15


def test_warmup_cosine_needs_a_budget_and_a_fractional_warmup_for_time_only_runs():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match="needs a budget"):
        WarmupCosine()(opt, _trainer(math.inf, None))
    with pytest.raises(ValueError, match="warm-up as a fraction"):
        WarmupCosine(warmup=10)(opt, _trainer(math.inf, 0.0))
    with pytest.raises(ValueError, match="lr_schedule.budget='wall'"):
        WarmupCosine(budget="wall")


@pytest.mark.parametrize(
    ("final_fraction", "expected"),
    [(0.0, [2.0, 1.5, 1.0, 0.5, 2.0, 1.5, 1.0, 0.5, 2.0]), (0.2, [2.0, 1.6, 1.2, 0.8, 2.0, 1.6, 1.2, 0.8, 2.0])],
)
def test_linear_restarts_decays_over_each_period_then_restarts_at_the_peak(final_fraction, expected):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    entry = LinearRestarts(period=4, final_fraction=final_fraction)(opt, _trainer(math.inf, None))
    assert entry["interval"] == "step"
    rates = []
    for _ in range(9):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        entry["scheduler"].step()
    assert rates == pytest.approx(expected)


def test_linear_restarts_over_listed_periods_decays_over_each_in_turn_then_repeats_the_last():
    """Periods [2, 4]: 1, 1/2 over the first; 1, 3/4, 1/2, 1/4 over the second; then the second again."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    entry = LinearRestarts(period=[2, 4])(opt, _trainer(math.inf, None))
    rates = []
    for _ in range(11):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        entry["scheduler"].step()
    assert rates == pytest.approx([1, 0.5, 1, 0.75, 0.5, 0.25, 1, 0.75, 0.5, 0.25, 1])


@pytest.mark.parametrize(
    ("period", "shown"),
    [(None, "null"), (0, "0"), (2.5, "2.5"), ("abc", "'abc'"), (True, "True"), ([], "[]"), ([2, 0], "[2, 0]")],
)
def test_linear_restarts_refuses_a_period_that_is_not_a_step_count(period, shown):
    with pytest.raises(
        ConfigError, match=rf"^lr_schedule.period={re.escape(shown)} is invalid: .*lr_schedule.period=N"
    ):
        LinearRestarts(period=period)


@pytest.mark.parametrize("final_fraction", [-0.1, 1.5, "low"])
def test_linear_restarts_refuses_a_final_fraction_outside_0_1(final_fraction):
    with pytest.raises(ConfigError, match=r"^lr_schedule.final_fraction=.* is invalid: a number in \[0, 1\]"):
        LinearRestarts(period=4, final_fraction=final_fraction)


def test_linear_restarts_takes_its_period_from_the_methods_rounds(tmp_path):
    from difflab.utils.compose import compose_train

    cfg = compose_train(tmp_path, ["experiment=digits_progressive", "lr_schedule=linear_restarts"])
    assert instantiate(cfg.lr_schedule).period == tuple(cfg.method.steps_per_round) == (160, 160, 320, 640, 320)
    cfg = compose_train(tmp_path, ["lr_schedule=linear_restarts", "lr_schedule.period=250"])
    assert instantiate(cfg.lr_schedule).period == 250


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_DIR / "optimizer").glob("*.yaml")))
def test_every_optimizer_option_trains_the_module_params(name):
    factory = instantiate(OmegaConf.load(CONFIG_DIR / "optimizer" / f"{name}.yaml"))
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = factory(list(net.parameters()), lr=1e-2)
    assert isinstance(opt, torch.optim.Optimizer)
    _steps(net, opt, 2)
    assert all(not torch.equal(b, p) for b, p in zip(before, net.parameters())), name
