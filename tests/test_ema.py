"""EMA callback: decay warm-up, update schedule, and the EMA-module lookup used by samplers."""

import pytest
import torch
from torch import nn

from difflab.callbacks.ema import EMA, ema_decay
from difflab.callbacks.ema_shadow import AveragedShadow


def test_decay_warmup_formula():
    assert ema_decay(0.999, 0, True) == 0.1
    assert ema_decay(0.999, 90, True) == 91 / 100
    assert ema_decay(0.999, 10**6, True) == 0.999
    assert ema_decay(0.9, 0, False) == 0.9


def test_should_update_every_n_from_start():
    ema = EMA(update_every=10, start_step=5)
    assert [s for s in range(40) if ema.should_update(step_idx=s)] == [5, 15, 25, 35]
    assert not ema.should_update(epoch_idx=3)


def test_lerp_matches_closed_form():
    ema = EMA(decay=0.9, warmup=False)
    avg, cur = [torch.zeros(3)], [torch.ones(3)]
    ema._lerp(avg, cur, None)
    torch.testing.assert_close(avg[0], torch.full((3,), 0.1))
    ema._lerp(avg, cur, None)
    torch.testing.assert_close(avg[0], torch.full((3,), 0.19))


def test_rejects_bad_decay():

    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.5)


def test_power_profile_weights_each_update_by_its_share_of_the_edm2_profile():
    """With sigma_rel, update i of t carries the mass of (g + 1) tau^g / t^(g + 1) on [i - 1, i] (EDM2 Sec. 3.1),
    whatever t is: the same relative length on a short run and a long one."""
    from difflab.diffusion.posthoc_ema import gamma_to_sigma_rel, sigma_rel_to_gamma

    ema = EMA(decay=None, sigma_rel=0.1)
    gamma = sigma_rel_to_gamma(0.1)
    assert ema.gamma == gamma and gamma_to_sigma_rel(ema.gamma) == pytest.approx(0.1)
    for t in (7, 60):
        ema.num_updates = 0
        avg = [torch.zeros(t, dtype=torch.float64)]
        for i in range(1, t + 1):
            ema._lerp(avg, [torch.eye(t, dtype=torch.float64)[i - 1]], None)
            ema.num_updates += 1
        i = torch.arange(1, t + 1, dtype=torch.float64)
        expect = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / t ** (gamma + 1)
        torch.testing.assert_close(avg[0], expect)
        mid = (i - 0.5) / t  # each bin's centre, relative to the run
        spread = ((avg[0] * mid**2).sum() - (avg[0] * mid).sum() ** 2).sqrt()
        assert abs(spread.item() - 0.1) < 0.02  # the binned profile's std relative to t is close to sigma_rel


def _relative_spread(ema: EMA, t: int) -> float:
    """The relative standard deviation (over the run's length) of the weights ``ema`` gives t updates."""
    ema.num_updates = 0
    avg = [torch.zeros(t, dtype=torch.float64)]
    for i in range(t):
        one_hot = torch.zeros(t, dtype=torch.float64)
        one_hot[i] = 1.0
        ema._lerp(avg, [one_hot], None)
        ema.num_updates += 1
    mid = (torch.arange(t, dtype=torch.float64) + 0.5) / t
    return ((avg[0] * mid**2).sum() - (avg[0] * mid).sum() ** 2).sqrt().item()


def test_a_warmed_up_constant_decay_is_a_fixed_fraction_of_runs_shorter_than_its_warm_up():
    """min(0.998, (1 + n) / (10 + n)) reaches 0.998 only after ~4490 updates: over the digits recipe's 800-1500-step
    runs the average is the warm-up's own, ~0.09 of the run whatever its length (what configs/experiment/digits.yaml
    and BENCHMARKS.md section 9b say), and only a longer run sees the constant's fixed ~500 updates."""
    ema = EMA(decay=0.998)
    short = [_relative_spread(ema, t) for t in (400, 900, 1600)]
    assert all(abs(s - 0.09) < 0.005 for s in short)
    assert _relative_spread(ema, 12000) < 0.06  # 500 of 12000 updates: shorter than the warm-up's share


def test_exactly_one_of_decay_and_sigma_rel():

    from difflab.utils.errors import ConfigError

    for kwargs in ({"decay": 0.999, "sigma_rel": 0.1}, {"decay": None}):
        with pytest.raises(ConfigError, match="exactly one of decay .* or sigma_rel") as err:
            EMA(**kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="callbacks.ema.sigma_rel=0.5"):
        EMA(decay=None, sigma_rel=0.5)


class _Regression(__import__("lightning").LightningModule):
    """A linear model with a float and an integer buffer, trained by SGD on fixed random data."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.register_buffer("running", torch.zeros(4))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.running.mul_(0.5).add_(x.mean(0))
        self.count += 1
        return nn.functional.mse_loss(self.lin(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _TorchPathShadow(AveragedShadow):
    def _tensor_pairs(self, pl_module):
        return None


class _TorchPathEMA(EMA):
    """The same callback forced onto AveragedModel.update_parameters (the reference path)."""

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        self.store.__class__ = _TorchPathShadow


def _fit_ema(ema_cls, steps=7):
    import lightning as L

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
    L.seed_everything(0)
    model = _Regression()
    ema = ema_cls(decay=0.8, update_every=2, warmup=True)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ema],
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    return ema


def test_cached_update_matches_averaged_model_path():
    fast, ref = _fit_ema(EMA), _fit_ema(_TorchPathEMA)
    assert fast.store._pairs is not None  # the cached path ran
    assert fast.num_updates == ref.num_updates == 4  # steps 0, 2, 4, 6
    a, b = fast._average_model.state_dict(), ref._average_model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert int(a["n_averaged"]) == 4 and int(a["module.count"]) == 7  # integer buffers are copied, not averaged
