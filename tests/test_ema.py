"""EMA callback: decay warm-up, update schedule, and the EMA-module lookup used by samplers."""
import torch
from torch import nn

from src.callbacks.ema import EMA, ema_decay


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
    import pytest
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.5)
