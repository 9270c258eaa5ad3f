"""Every digits judge (difflab.eval.digits_eval): the independent second judge, FD on pixels against its closed form,
k-NN precision / recall with a held-out floor, and `sample.py judge=digits` feeding `ablate.py`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import linalg

from difflab.datamodules.digits import load_digits_tensors
from difflab.eval.digit_classifier import DigitClassifier
from difflab.eval.digit_judge2 import SEED, VAL_FRACTION, DigitJudge2, load_digit_judge2
from difflab.eval.digits_eval import DIGIT_JUDGES, evaluate_samples, real_floor_metrics

torch.set_num_threads(1)


def test_the_second_judge_is_another_network_and_reads_its_held_out_digits():
    judge2 = load_digit_judge2()
    assert isinstance(judge2, DigitJudge2) and DigitJudge2.feature_dim != DigitClassifier.feature_dim
    kinds2 = {type(m).__name__ for m in judge2.modules()}
    kinds1 = {type(m).__name__ for m in DigitClassifier().modules()}
    assert "MaxPool2d" in kinds2 - kinds1 and "Tanh" in kinds2 - kinds1
    x, y = load_digits_tensors(16)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
    held_out = order[: int(VAL_FRACTION * len(x))]
    with torch.no_grad():
        accuracy = (judge2(x[held_out]).argmax(1) == y[held_out]).float().mean().item()
    assert accuracy >= 0.97  # the shipped weights are the documented training run's


def _frechet_closed_form(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors(16)


def test_pixel_fd_is_the_frechet_distance_of_the_raw_pixels(digits):
    x, y = digits
    blurred = torch.nn.functional.avg_pool2d(x[:300], 3, 1, 1)
    got = evaluate_samples(blurred, y[:300])["fd_pixel"]
    want = _frechet_closed_form(blurred.flatten(1).double().numpy(), x.flatten(1).double().numpy())
    assert got == pytest.approx(want, rel=1e-4)


def test_every_judge_separates_real_digits_from_noise_and_from_wrong_labels(digits):
    x, y = digits
    floor = real_floor_metrics(300)
    assert set(DIGIT_JUDGES) <= set(floor)
    assert floor["accuracy"] > 0.98 and floor["accuracy_judge2"] > 0.98
    assert 0.6 < floor["precision"] < 1.0 and 0.6 < floor["recall"] < 1.0  # held-out half: not trivially 1
    noise = torch.rand(300, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = evaluate_samples(noise, y[:300])
    for key in ("fd", "fd_judge2", "fd_pixel"):
        assert bad[key] > 20 * floor[key], key
    assert bad["recall"] < 0.1 and bad["recall_judge2"] < 0.1
    shuffled = evaluate_samples(x[:300], y[:300].roll(1))
    assert shuffled["accuracy"] < 0.2 and shuffled["accuracy_judge2"] < 0.2


def test_sample_judge_writes_metrics_that_ablate_summarises(run_dir, tmp_path):
    """`sample.py -m seed=0,1 ckpt_path=<dir>/s${seed}.ckpt judge=digits guidance.scale=1,2`: one training run per seed
    (an interpolated path), every job scored, the grid complete for ablate.py."""
    import sample
    from difflab.ablation.sweep import read_sweep
    from tests.helpers import run_hydra_main

    for seed in (0, 1):
        (tmp_path / f"s{seed}.ckpt").symlink_to(run_dir / "checkpoints" / "last.ckpt")
    sweep = tmp_path / "sweep"
    argv = ["-m", f"hydra.sweep.dir={sweep}", "seed=0,1", f"ckpt_path={tmp_path}/s${{seed}}.ckpt", "n=20"]
    argv += ["batch_size=20", "device=cpu", "judge=digits", "guidance.scale=1,2"]
    assert run_hydra_main(sample.main, argv) == 0
    final = json.loads((sweep / "0" / "final_metrics.json").read_text())
    assert final["status"] == "completed" and {f"eval/{k}" for k in DIGIT_JUDGES} <= set(final["metrics"])
    protocol = json.loads((sweep / "0" / "metrics" / "protocol.json").read_text())
    assert protocol["eval/fd"]["floor"] > 0 and protocol["eval/fd"]["eval_seed"] == 0
    read = read_sweep(sweep)
    assert len(read.jobs) == 4 and not read.missing_points() and read.swept_keys == ["seed", "guidance.scale"]
