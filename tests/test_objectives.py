"""Objectives: target conversions on every process's path, loss weightings on log-SNR (min-SNR per target, EDM's),
losses, training-time densities, noise sampling, x0 clipping, the LPIPS perceptual term and the objective configs."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from difflab.configs import CONFIG_DIR
from difflab.diffusion.objectives import (
    ALPHA_BAR_FLOOR,
    LOSS_WEIGHTINGS,
    PREDICTIONS,
    Objective,
    X0Clip,
    add_noise,
    bucket_edges,
    clip_x0,
    edm_coefficients,
    elementwise_loss,
    eps_to_target_units,
    inv_snr_clamped_weight,
    log_snr_buckets,
    min_snr_weight,
    offset_noise_like,
    predictions_from_output,
    training_target,
)
from difflab.diffusion.processes import EDMProcess, FlowProcess, VPProcess
from difflab.diffusion.schedules import sample_timesteps

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = {"vp": lambda: VPProcess("cosine", 1000), "edm": EDMProcess, "flow": FlowProcess}


def _data(shape=(6, 2, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def _path(process, t):
    """(alpha, sigma, dalpha, dsigma) at times t, shaped B x 1 x 1 x 1 (derivatives None on a discrete process)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    a, s = (v.view(-1, 1, 1, 1) for v in process.coefficients(t))
    if not process.continuous:
        return a, s, None, None
    da, ds = (v.view(-1, 1, 1, 1) for v in process.derivatives(t))
    return a, s, da, ds


TIMES = {"vp": [0, 100, 500, 900, 999], "edm": [0.002, 0.1, 1.0, 10.0, 80.0], "flow": [0.001, 0.1, 0.5, 0.9, 1.0]}


def _cases():
    for name in PROCESSES:
        for p in PREDICTIONS:
            if p == "flow" and name == "vp":
                continue  # the velocity needs d x_t / dt: not defined on the discrete tables
            yield name, p


@pytest.mark.parametrize("process_name, prediction", list(_cases()))
def test_conversions_round_trip_on_every_process(process_name, prediction):
    x0, eps = _data((5, 2, 4, 4))
    a, s, da, ds = _path(PROCESSES[process_name](), TIMES[process_name])
    x_t = add_noise(x0, eps, a, s)
    out = training_target(x0, eps, a, s, prediction, da, ds)
    x0_hat, eps_hat = predictions_from_output(out, x_t, a, s, prediction, da, ds)
    ok = slice(0, 4) if prediction in ("eps", "edm") and process_name == "flow" else slice(None)  # no x0 at t = 1
    assert torch.allclose(x0_hat[ok], x0[ok], atol=1e-7) and torch.allclose(eps_hat[ok], eps[ok], atol=1e-7)
    assert torch.isfinite(x0_hat).all() and torch.isfinite(eps_hat).all()


def test_closed_forms_of_the_targets():
    x0, eps = torch.tensor([2.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    a, s = torch.tensor([0.6], dtype=torch.float64), torch.tensor([0.8], dtype=torch.float64)
    assert training_target(x0, eps, a, s, "v").item() == pytest.approx(0.6 * -1.0 - 0.8 * 2.0)  # Salimans & Ho
    t = torch.tensor([0.3], dtype=torch.float64)  # flow: x_t = 0.7 x0 + 0.3 eps, velocity eps - x0
    assert training_target(x0, eps, 1 - t, t, "flow", -torch.ones(1), torch.ones(1)).item() == pytest.approx(-3.0)
    x_t = 0.7 * x0 + 0.3 * eps  # flow: x0 = x_t - t u, eps = x_t + (1 - t) u (the SD3 formulas)
    u = torch.tensor([-3.0], dtype=torch.float64)
    got = predictions_from_output(u, x_t, 1 - t, t, "flow", -torch.ones(1), torch.ones(1))
    assert got[0].item() == pytest.approx((x_t - t * u).item()) and got[1].item() == pytest.approx(
        (x_t + 0.7 * u).item()
    )
    sig, sd = torch.tensor([1.5], dtype=torch.float64), 0.5  # EDM Table 1 at alpha = 1
    c_skip, c_out, c_in = edm_coefficients(torch.ones(1, dtype=torch.float64), sig, sd)
    assert c_skip.item() == pytest.approx(0.25 / (2.25 + 0.25)) and c_in.item() == pytest.approx(1 / 2.5**0.5)
    assert all(torch.isfinite(c).all() for c in edm_coefficients(torch.zeros(1), torch.ones(1), sd))  # alpha = 0
    assert c_out.item() == pytest.approx(1.5 * 0.5 / 2.5**0.5)
    # eps prediction at alpha = 0: x0 = (x - out) / sqrt(floor), finite
    x0_hat, _ = predictions_from_output(
        torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]), "eps"
    )
    assert x0_hat.item() == pytest.approx(0.5 / math.sqrt(ALPHA_BAR_FLOOR))


@pytest.mark.parametrize("process_name", list(PROCESSES))
def test_min_snr_and_edm_weights_are_one_x0_space_weight_for_every_target(process_name):
    """Weighted MSE for the same x0 estimate is w_x0(snr) |x0 err|^2 whatever the target (Hang et al.; EDM's lambda)."""
    process = PROCESSES[process_name]()
    x0, eps = _data((5, 1, 3, 3))
    t = torch.tensor(TIMES[process_name][:-1] + [TIMES[process_name][-1] * 0.9], dtype=torch.float64)
    a, s, da, ds = _path(process, t)
    log_snr = process.log_snr_at(t)
    snr = log_snr.exp()
    x_t = add_noise(x0, eps, a, s)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eps_hat = (x_t - a * x0_hat) / s
    x0_err = elementwise_loss(x0_hat, x0).double()
    expected = {
        "min_snr": snr.clamp(max=5.0) * x0_err,
        "edm": (1 / snr + 0.25) / (0.25 / snr) * x0_err,
    }  # lambda = (s^2 + sd^2) / (s sd)^2, s^2 = 1 / snr
    for p in PREDICTIONS:
        if p == "flow" and da is None:
            continue
        raw = elementwise_loss(
            training_target(x0_hat, eps_hat, a, s, p, da, ds), training_target(x0, eps, a, s, p, da, ds)
        ).double()
        units = eps_to_target_units(
            a.flatten(), s.flatten(), p, *(None if v is None else v.flatten() for v in (da, ds))
        )
        for name, fn in (
            ("min_snr", lambda ls: min_snr_weight(ls, gamma=5.0)),
            ("edm", lambda ls: LOSS_WEIGHTINGS["edm"](ls, sigma_data=0.5)),
        ):
            w, kind = fn(log_snr)
            assert kind == "eps"
            assert torch.allclose(raw * w * units, expected[name], rtol=1e-6), (p, name)
    # the bug of diffusers#5096: using the eps form for v over-weights high-SNR steps by (snr + 1) / snr
    v_raw = elementwise_loss(training_target(x0_hat, eps_hat, a, s, "v"), training_target(x0, eps, a, s, "v")).double()
    assert not torch.allclose(v_raw * min_snr_weight(log_snr, gamma=5.0)[0], expected["min_snr"], rtol=1e-2)


def test_edm_weight_is_uniform_for_the_edm_target():
    a, s = torch.ones(4, dtype=torch.float64), torch.tensor([0.01, 0.5, 2.0, 50.0], dtype=torch.float64)
    w, _ = LOSS_WEIGHTINGS["edm"](2 * (a / s).log(), sigma_data=0.5)
    assert torch.allclose(w * eps_to_target_units(a, s, "edm"), torch.ones(4, dtype=torch.float64))


def test_min_snr_limits_and_inverse_snr_weighting():
    snr = torch.tensor([0.0, 1.0, 5.0, 100.0], dtype=torch.float64)
    log_snr = snr.log()
    a, s = (snr / (1 + snr)).sqrt(), (1 / (1 + snr)).sqrt()
    w, _ = min_snr_weight(log_snr, gamma=5.0)
    assert w.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.05])  # eps units: exactly 1 at zero terminal SNR
    assert (w * eps_to_target_units(a, s, "v")).tolist() == pytest.approx([0.0, 0.5, 5 / 6, 5 / 101])
    assert (w * eps_to_target_units(a, s, "x0")).tolist() == pytest.approx([0.0, 1.0, 5.0, 5.0])
    got, units = inv_snr_clamped_weight(log_snr, snr_min=0.1, snr_max=10.0)
    assert units == "target" and got.tolist() == pytest.approx([10.0, 1.0, 0.2, 0.1])


@pytest.mark.parametrize("kind", ["mse", "l1", "huber"])
def test_elementwise_losses_match_torch(kind):
    a, b = _data((3, 2, 5, 5))
    b = 3 * b
    ref = {
        "mse": F.mse_loss,
        "l1": F.l1_loss,
        "huber": lambda x, y, reduction: F.huber_loss(x, y, reduction=reduction, delta=0.5),
    }[kind]
    got = elementwise_loss(a, b, kind, huber_delta=0.5)
    assert torch.allclose(got, torch.stack([ref(a[i], b[i], reduction="mean") for i in range(3)]).float())


def test_timestep_sampling_uniform_and_logit_normal():
    g = torch.Generator().manual_seed(0)
    u = sample_timesteps(20000, 1000, "uniform", generator=g)
    assert u.min() >= 0 and u.max() <= 999 and abs(u.float().mean().item() - 499.5) < 8
    ln = sample_timesteps(20000, 1000, "logit_normal", mean=0.0, std=1.0, generator=g)
    middle = ((ln >= 250) & (ln < 750)).float().mean().item()
    expected = math.erf(math.log(3) / math.sqrt(2))  # P(|N(0,1)| < logit(0.75))
    assert abs(middle - expected) < 0.015
    shifted = sample_timesteps(20000, 1000, "logit_normal", mean=1.0, generator=g)
    assert shifted.float().mean() > 600
    a = sample_timesteps(8, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, sample_timesteps(8, 100, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="timestep density"):
        sample_timesteps(4, 10, "beta")


def test_offset_noise_adds_a_per_channel_constant():
    x = torch.zeros(4000, 2, 8, 8)
    plain = offset_noise_like(x, 0.0, torch.Generator().manual_seed(0))
    offset = offset_noise_like(x, 0.5, torch.Generator().manual_seed(0))
    var_plain = plain.mean(dim=(2, 3)).var().item()
    var_off = offset.mean(dim=(2, 3)).var().item()
    assert var_plain == pytest.approx(1 / 64, rel=0.1)
    assert var_off == pytest.approx(1 / 64 + 0.25, rel=0.1)


def test_static_and_dynamic_clipping():
    x = torch.tensor([[0.5, -3.0, 2.0, 0.1], [0.2, -0.3, 0.9, 0.0]], dtype=torch.float64)
    assert clip_x0(x, "static").tolist() == [[0.5, -1.0, 1.0, 0.1], [0.2, -0.3, 0.9, 0.0]]
    d = clip_x0(x, "dynamic", dynamic_quantile=0.5)
    s0 = torch.quantile(x[0].abs(), 0.5).item()  # 1.25
    assert d[0].tolist() == pytest.approx([0.5 / s0, -1.0, 1.0, 0.1 / s0])
    assert d[1].tolist() == pytest.approx(x[1].tolist()), "s is at least 1: in-range samples are unchanged"
    capped = clip_x0(x * 10, "dynamic", dynamic_quantile=0.99, dynamic_max=2.0)
    assert capped.abs().max().item() == pytest.approx(1.0) and capped[1, 2].item() == pytest.approx(1.0)
    assert X0Clip("none")(x) is x and str(X0Clip("dynamic")) == "dynamic"
    with pytest.raises(ValueError, match="x0_clip"):
        X0Clip("soft")


class TinyNet(nn.Module):
    def __init__(self, channels=1):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) + 1e-3 * t.view(-1, *([1] * (x.ndim - 1))).float()


@pytest.mark.parametrize("prediction", [p for p in PREDICTIONS if p != "flow"])
@pytest.mark.parametrize("weighting", sorted(w for w in LOSS_WEIGHTINGS if w != "edm"))
def test_zero_terminal_snr_with_every_weighting_has_no_nan(prediction, weighting):
    sch = VPProcess("cosine", 100, zero_terminal_snr=True)
    obj = Objective(prediction=prediction, weighting=weighting)
    net = TinyNet()
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    t = torch.tensor([99, 99, 98, 50, 10, 1, 0, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eps + zero SNR warns by design
        out = obj.losses(net, x0, sch, t=t, generator=torch.Generator().manual_seed(0))
    out["loss"].mean().backward()
    assert torch.isfinite(out["loss"]).all() and torch.isfinite(out["raw"]).all()
    assert torch.isfinite(out["x0_hat"]).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_eps_with_zero_terminal_snr_warns_once():
    sch = VPProcess("cosine", 50, zero_terminal_snr=True)
    obj = Objective(prediction="eps")
    with pytest.warns(UserWarning, match="zero terminal SNR") as rec:
        obj.losses(TinyNet(), torch.zeros(2, 1, 4, 4), sch)
        obj.losses(TinyNet(), torch.zeros(2, 1, 4, 4), sch)
    assert sum("zero terminal SNR" in str(w.message) for w in rec) == 1


def test_losses_weight_and_report_what_the_module_needs():
    sch = VPProcess("linear", 100)
    obj = Objective(prediction="v", weighting="min_snr", min_snr_gamma=2.0)
    x0 = torch.rand(4, 1, 8, 8)
    t = torch.tensor([0, 10, 50, 99])
    out = obj.losses(TinyNet(), x0, sch, t=t, generator=torch.Generator().manual_seed(0))
    snr = sch.snr[t].float()
    assert torch.allclose(out["loss"], out["raw"] * snr.clamp(max=2.0) / (snr + 1))
    assert out["x0_hat"].shape == x0.shape and torch.equal(out["t"], t)
    assert torch.allclose(out["log_snr"], sch.log_snr[t])
    video = torch.rand(2, 1, 3, 4, 4)
    vout = obj.losses(lambda x, tt: torch.zeros_like(x), video, sch)
    assert vout["loss"].shape == (2,) and vout["x0_hat"].shape == video.shape


def test_log_snr_buckets_and_edges():
    log_snr = torch.tensor([20.0, 10.0, 7.9, 0.1, -0.1, -9.9, -math.inf])
    assert log_snr_buckets(log_snr, 10).tolist() == [0, 0, 1, 4, 5, 9, 9]  # bucket 0 = least noise, ends clamped
    edges = bucket_edges(10)
    assert edges[0] == (10.0, 8.0) and edges[-1] == pytest.approx((-8.0, -10.0))


@pytest.mark.parametrize("process_name", list(PROCESSES))
def test_every_process_reaches_the_same_log_snr_levels(process_name):
    process = PROCESSES[process_name]()
    target = torch.tensor([6.0, 2.0, 0.0, -2.0, -5.0], dtype=torch.float64)
    got = process.log_snr_at(process.time_from_log_snr(target))
    tol = 0.05 if process_name == "vp" else 1e-9  # vp: the nearest of its 1000 steps
    assert torch.allclose(got, target, atol=tol)


@pytest.mark.parametrize("process_name", ["edm", "flow"])
@pytest.mark.parametrize("prediction", ["eps", "v", "edm", "flow", "x0"])
def test_objective_trains_on_continuous_processes(process_name, prediction):
    process = PROCESSES[process_name]()
    obj = Objective(prediction=prediction, weighting="min_snr")
    net = TinyNet()
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    out = obj.losses(net, x0, process, generator=torch.Generator().manual_seed(0))
    out["loss"].mean().backward()
    assert torch.isfinite(out["loss"]).all() and out["t"].shape == (8,) and torch.isfinite(out["x0_hat"]).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_velocity_target_needs_a_continuous_process():
    with pytest.raises(ValueError, match="continuous process"):
        Objective(prediction="flow").check_process(VPProcess("cosine", 100))


def test_lpips_term_adds_to_the_loss_and_trains_the_prediction(squeeze_backbone):
    sch = VPProcess("cosine", 100)
    obj = Objective(prediction="x0", lpips_weight=0.5, lpips_net="squeeze", lpips_backbone=str(squeeze_backbone))
    net = TinyNet(3)
    x0 = torch.rand(3, 3, 16, 16) * 2 - 1
    out = obj.losses(net, x0, sch, t=torch.tensor([5, 50, 90]), generator=torch.Generator().manual_seed(0))
    assert "lpips" in out and out["lpips"].shape == (3,) and bool((out["lpips"] > 0).all())
    assert torch.allclose(out["loss"], out["raw"] + 0.5 * out["lpips"])
    out["lpips"].sum().backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0
    # the LPIPS network is not part of any module that holds the objective
    holder = nn.Module()
    holder.net = net
    holder.objective = obj
    assert set(holder.state_dict()) == {"net.conv.weight", "net.conv.bias"}
    assert len(list(holder.parameters())) == 2
    clone = copy.deepcopy(holder)  # what the EMA callback does
    assert clone.objective.perceptual._holder is obj.perceptual._holder


def test_lpips_on_videos_is_the_mean_over_frames(squeeze_backbone):
    from difflab.metrics.lpips_metric import build_lpips, lpips_distance

    obj = Objective(prediction="x0", lpips_weight=1.0, lpips_net="squeeze", lpips_backbone=str(squeeze_backbone))
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 1, 3, 32, 32, generator=g) * 2 - 1
    got = obj.perceptual(a, b)
    ref = lpips_distance(build_lpips("squeeze", squeeze_backbone), a, b)
    assert torch.allclose(got, ref, atol=1e-6)
    with pytest.raises(ValueError, match="latent"):
        obj.perceptual(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8))


def test_missing_lpips_weights_disable_the_term_with_one_warning(tmp_path):
    obj = Objective(prediction="v", lpips_weight=1.0, lpips_backbone=str(tmp_path / "alexnet-owt-7be5be79.pth"))
    sch = VPProcess("cosine", 50)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        outs = [obj.losses(TinyNet(3), torch.zeros(2, 3, 8, 8), sch) for _ in range(3)]
    msgs = [str(w.message) for w in rec if "LPIPS" in str(w.message)]
    assert len(msgs) == 1 and "objective.lpips_backbone" in msgs[0]
    assert all("lpips" not in o and torch.allclose(o["loss"], o["raw"]) for o in outs)


@pytest.mark.parametrize("name", ["eps", "x0", "v"])
def test_objective_configs_compose(name):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "process=vp",
                f"objective={name}",
                "objective.weighting=min_snr",
                "objective.loss=huber",
                "schedule.density=logit_normal",
                "objective.offset_noise=0.1",
                "objective.x0_clip=dynamic",
            ],
        )
    assert instantiate(cfg.schedule).density == "logit_normal"
    obj = instantiate(cfg.objective)
    assert isinstance(obj, Objective) and obj.prediction == name and obj.weighting == "min_snr"
    assert obj.x0_clip.mode == "dynamic" and obj.perceptual is None
    with pytest.raises(ValueError, match="objective.weighting"):
        Objective(weighting="snr_plus_one")
    with pytest.raises(ValueError, match="objective.loss"):
        Objective(loss="l2")
