"""Objectives: target conversions, loss weightings (min-SNR per target), losses, timestep / noise sampling, x0
clipping, the LPIPS perceptual term and the objective configs."""
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
from difflab.diffusion.objectives import (ALPHA_BAR_FLOOR, LOSS_WEIGHTINGS, PREDICTIONS, Objective, X0Clip, add_noise,
                                      clip_x0, elementwise_loss, inv_snr_clamped_weight, min_snr_weight,
                                      offset_noise_like, predictions_from_output, sample_timesteps, timestep_buckets,
                                      training_target)
from difflab.diffusion.schedules import DiscreteSchedule

ROOT = Path(__file__).resolve().parents[1]


def _data(shape=(6, 2, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_conversions_round_trip(prediction):
    x0, eps = _data()
    ab = torch.tensor([0.9999, 0.9, 0.5, 0.1, 1e-4, 0.0], dtype=torch.float64).view(-1, 1, 1, 1)
    x_t = add_noise(x0, eps, ab)
    out = training_target(x0, eps, ab, prediction)
    x0_hat, eps_hat = predictions_from_output(out, x_t, ab, prediction)
    ok = slice(None) if prediction != "eps" else slice(0, 5)  # eps cannot give x0 at alpha_bar = 0
    assert torch.allclose(x0_hat[ok], x0[ok], atol=1e-9) and torch.allclose(eps_hat, eps, atol=1e-9)
    assert torch.isfinite(x0_hat).all() and torch.isfinite(eps_hat).all()


def test_v_target_closed_form_and_eps_at_zero_snr():
    x0, eps = torch.tensor([2.0]), torch.tensor([-1.0])
    ab = torch.tensor([0.36])
    assert training_target(x0, eps, ab, "v").item() == pytest.approx(0.6 * -1.0 - 0.8 * 2.0)
    # eps prediction at alpha_bar = 0: x0 = (x - out) / sqrt(floor), finite
    x0_hat, _ = predictions_from_output(torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([0.0]), "eps")
    assert x0_hat.item() == pytest.approx(0.5 / math.sqrt(ALPHA_BAR_FLOOR))


def test_min_snr_weights_are_the_same_x0_space_weight_for_every_target():
    """Weighted MSE for the same x0 estimate is min(snr, gamma) |x0 err|^2 whatever the target (Hang et al.)."""
    x0, eps = _data((5, 1, 3, 3))
    ab = torch.tensor([0.999, 0.9, 0.5, 0.05, 0.001], dtype=torch.float64).view(-1, 1, 1, 1)
    snr = (ab / (1 - ab)).flatten()
    x_t = add_noise(x0, eps, ab)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eps_hat = (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
    x0_err = elementwise_loss(x0_hat, x0)
    expected = snr.clamp(max=5.0).float() * x0_err
    for p in PREDICTIONS:
        out = training_target(x0_hat, eps_hat, ab, p)
        raw = elementwise_loss(out, training_target(x0, eps, ab, p))
        assert torch.allclose(raw * min_snr_weight(snr, p, gamma=5.0).float(), expected, rtol=1e-4), p
    # the bug of diffusers#5096: using the eps form for v over-weights high-SNR steps by (snr + 1) / snr
    v_raw = elementwise_loss(training_target(x0_hat, eps_hat, ab, "v"), training_target(x0, eps, ab, "v"))
    assert not torch.allclose(v_raw * min_snr_weight(snr, "eps", gamma=5.0).float(), expected, rtol=1e-2)


def test_min_snr_limits_and_inverse_snr_weighting():
    snr = torch.tensor([0.0, 1.0, 5.0, 100.0])
    assert min_snr_weight(snr, "eps", gamma=5.0).tolist() == pytest.approx([1.0, 1.0, 1.0, 0.05])
    assert min_snr_weight(snr, "v", gamma=5.0).tolist() == pytest.approx([0.0, 0.5, 5 / 6, 5 / 101])
    assert min_snr_weight(snr, "x0", gamma=5.0).tolist() == pytest.approx([0.0, 1.0, 5.0, 5.0])
    assert inv_snr_clamped_weight(snr, "v", snr_min=0.1, snr_max=10.0).tolist() == pytest.approx([10.0, 1.0, 0.2, 0.1])


@pytest.mark.parametrize("kind", ["mse", "l1", "huber"])
def test_elementwise_losses_match_torch(kind):
    a, b = _data((3, 2, 5, 5))
    b = 3 * b
    ref = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": lambda x, y, reduction: F.huber_loss(x, y, reduction=reduction,
                                                                                             delta=0.5)}[kind]
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
    with pytest.raises(ValueError, match="timestep sampling"):
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


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting", sorted(LOSS_WEIGHTINGS))
def test_zero_terminal_snr_with_every_weighting_has_no_nan(prediction, weighting):
    sch = DiscreteSchedule("cosine", 100, zero_terminal_snr=True)
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
    sch = DiscreteSchedule("cosine", 50, zero_terminal_snr=True)
    obj = Objective(prediction="eps")
    with pytest.warns(UserWarning, match="zero terminal SNR") as rec:
        obj.losses(TinyNet(), torch.zeros(2, 1, 4, 4), sch)
        obj.losses(TinyNet(), torch.zeros(2, 1, 4, 4), sch)
    assert sum("zero terminal SNR" in str(w.message) for w in rec) == 1


def test_losses_weight_and_report_what_the_module_needs():
    sch = DiscreteSchedule("linear", 100)
    obj = Objective(prediction="v", weighting="min_snr", min_snr_gamma=2.0)
    x0 = torch.rand(4, 1, 8, 8)
    t = torch.tensor([0, 10, 50, 99])
    out = obj.losses(TinyNet(), x0, sch, t=t, generator=torch.Generator().manual_seed(0))
    snr = sch.snr[t].float()
    assert torch.allclose(out["loss"], out["raw"] * snr.clamp(max=2.0) / (snr + 1))
    assert out["x0_hat"].shape == x0.shape and torch.equal(out["t"], t)
    video = torch.rand(2, 1, 3, 4, 4)
    vout = obj.losses(lambda x, tt: torch.zeros_like(x), video, sch)
    assert vout["loss"].shape == (2,) and vout["x0_hat"].shape == video.shape


def test_timestep_buckets():
    t = torch.tensor([0, 99, 100, 555, 999])
    assert timestep_buckets(t, 1000, 10).tolist() == [0, 0, 1, 5, 9]


@pytest.fixture(scope="module")
def squeeze_backbone(tmp_path_factory):
    """A randomly initialised torchvision squeezenet1_1 state dict: the on-disk format of the real backbone."""
    from torchvision.models import squeezenet1_1

    path = tmp_path_factory.mktemp("lpips") / "squeezenet1_1-b8a52dc0.pth"
    torch.manual_seed(0)
    torch.save(squeezenet1_1(weights=None).state_dict(), path)
    return path


def test_lpips_term_adds_to_the_loss_and_trains_the_prediction(squeeze_backbone):
    sch = DiscreteSchedule("cosine", 100)
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
    sch = DiscreteSchedule("cosine", 50)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        outs = [obj.losses(TinyNet(3), torch.zeros(2, 3, 8, 8), sch) for _ in range(3)]
    msgs = [str(w.message) for w in rec if "LPIPS" in str(w.message)]
    assert len(msgs) == 1 and "objective.lpips_backbone" in msgs[0]
    assert all("lpips" not in o and torch.allclose(o["loss"], o["raw"]) for o in outs)


@pytest.mark.parametrize("name", ["eps", "x0", "v"])
def test_objective_configs_compose(name):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"objective={name}", "objective.weighting=min_snr", "objective.loss=huber",
                                          "objective.timestep_sampling=logit_normal", "objective.offset_noise=0.1",
                                          "objective.x0_clip=dynamic"])
    obj = instantiate(cfg.objective)
    assert isinstance(obj, Objective) and obj.prediction == name and obj.weighting == "min_snr"
    assert obj.x0_clip.mode == "dynamic" and obj.perceptual is None
    with pytest.raises(ValueError, match="objective.weighting"):
        Objective(weighting="snr_plus_one")
    with pytest.raises(ValueError, match="objective.loss"):
        Objective(loss="l2")
