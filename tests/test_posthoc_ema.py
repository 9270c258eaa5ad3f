"""Post-hoc EMA (Karras et al. 2024, EDM2, arXiv 2312.02696): the profile math (src/diffusion/posthoc_ema.py), the
snapshot callback (src/callbacks/posthoc_ema.py) on a synthetic trajectory and in a tiny training run with resume,
and the reconstruct command (src/reconstruct_ema.py): its checkpoints load and sample, sweeps write one file per
value, bad input is one ``error:`` line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from difflab.callbacks.posthoc_ema import (
    PostHocEMA,
    list_snapshots,
    read_snapshot_info,
    read_snapshot_tensors,
    thin_evenly,
)
from difflab.diffusion.posthoc_ema import (
    SIGMA_REL_MAX,
    check_expressible,
    combine_state_dicts,
    gamma_to_sigma_rel,
    power_ema_beta,
    profile_inner_products,
    sigma_rel_to_gamma,
    solve_coefficients,
)
from difflab.reconstruct_ema import reconstruct_weights
from difflab.utils.errors import ConfigError
from tests.helpers import compose_train, run_hydra_main, tiny_overrides

torch.set_num_threads(1)

TRACKED = (0.05, 0.10)
UNTRACKED = (0.03, 0.07, 0.15)
STEPS, EVERY, DIM = 2000, 100, 64


# ---------------------------------------------------------------------------------------------- (c) the math
def test_sigma_rel_gamma_round_trip_and_known_values():
    """EDM2 Sec. 3.1: gamma 6.94 <-> sigma_rel 0.0999723 and gamma 16.97 <-> sigma_rel 0.0500055 (computed from
    sqrt((g + 1) / ((g + 2)^2 (g + 3)))); the inverse returns the exponents of the paper's two profiles."""
    assert gamma_to_sigma_rel(6.94) == pytest.approx(0.10, abs=5e-4)
    assert gamma_to_sigma_rel(16.97) == pytest.approx(0.05, abs=5e-4)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    for s in (0.005, 0.03, 0.07, 0.15, 0.25, SIGMA_REL_MAX):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    with pytest.raises(ValueError):
        sigma_rel_to_gamma(0.4)


def test_beta_gives_the_binned_power_profile_and_inner_products_match_integration():
    """Tracking with beta_t = (1 - 1/t)^(gamma + 1) weights step i by (i^(g+1) - (i-1)^(g+1)) / t^(g+1), the mass of
    the profile (g + 1) tau^g / t^(g+1) on [i - 1, i]; the closed-form inner product equals numeric integration."""
    g, t = sigma_rel_to_gamma(0.1), 50
    ema = torch.zeros(t, dtype=torch.float64)
    for step in range(1, t + 1):
        ema.lerp_(torch.eye(t, dtype=torch.float64)[step - 1], 1 - power_ema_beta(step, g))
    i = np.arange(1, t + 1, dtype=np.float64)
    np.testing.assert_allclose(ema.numpy(), (i ** (g + 1) - (i - 1) ** (g + 1)) / t ** (g + 1), rtol=1e-10)

    tau = np.linspace(0, 900, 2_000_001)

    def profile(gamma, t_):
        return np.where(tau <= t_, (gamma + 1) * tau**gamma / t_ ** (gamma + 1), 0.0)

    for (ga, ta), (gb, tb) in [((6.94, 900), (16.97, 600)), ((16.97, 300), (3.0, 900))]:
        numeric = np.trapezoid(profile(ga, ta) * profile(gb, tb), tau)
        assert profile_inner_products(ga, ta, gb, tb) == pytest.approx(numeric, rel=1e-4)


def test_coefficients_sum_to_one_and_combination_is_linear():
    """Snapshots every 100 of 1500 steps reconstruct sigma_rel 0.07 with a profile residual of 0.43% and coefficients
    summing to 1.0001 (the two profiles of the last snapshot alone: 4.4% and 1.036)."""
    gammas = [sigma_rel_to_gamma(s) for s in TRACKED] * 15
    steps = [t for t in range(100, 1501, 100) for _ in TRACKED]
    x, residual = solve_coefficients(gammas, steps, sigma_rel_to_gamma(0.07), 1500)
    assert x.sum() == pytest.approx(1.0, abs=1e-3) and residual < 0.01
    sds = [{"w": torch.full((3,), float(k)), "n": torch.tensor([7])} for k in range(len(x))]
    out = combine_state_dicts(iter(sds), x)
    assert out["w"].dtype == torch.float32 and out["n"].tolist() == [7]
    assert out["w"][0].item() == pytest.approx(float(np.dot(x, np.arange(len(x)))), rel=1e-5)


def test_a_parameter_that_never_changes_is_reconstructed_exactly():
    """The case of the report: snapshots every 150 steps up to 1500 at sigma_rel 0.15 gave raw least-squares
    coefficients whose sum missed 1 by 2.5e-3, scaling a constant parameter by it. Rescaled as EDM2's
    solve_posthoc_coefficients does, the constant comes back unchanged."""
    gammas = [sigma_rel_to_gamma(s) for s in TRACKED] * 10
    steps = [t for t in range(150, 1501, 150) for _ in TRACKED]
    x, residual = solve_coefficients(gammas, steps, sigma_rel_to_gamma(0.15), 1500)
    assert float(x.sum()) == pytest.approx(1.0, abs=1e-12) and residual < 0.05
    constant = torch.tensor([0.3, -1.7, 2.5e4], dtype=torch.float32)
    out = combine_state_dicts(iter([{"w": constant.clone()} for _ in x]), x)
    torch.testing.assert_close(out["w"], constant, rtol=1e-6, atol=0)


def test_thinning_keeps_first_and_last_and_spreads_the_rest():
    steps = list(range(250, 10_001, 250))
    dropped = thin_evenly(steps, 8)
    kept = sorted(set(steps) - set(dropped))
    assert len(kept) == 8 and kept[0] == 250 and kept[-1] == 10_000
    gaps = np.diff(kept)
    assert gaps.max() <= 2.5 * gaps.min(), kept
    assert thin_evenly([1, 2, 3], 1) == [2, 1]


# ---------------------------------------------------------------------------------------------- (a), (b) synthetic
def _drive(callbacks: list[PostHocEMA], trajectory: torch.Tensor, root: Path) -> None:
    """Feed a weight trajectory theta_1..theta_T through the callbacks' training hooks, one optimizer step each."""
    module = nn.Module()
    module.w = nn.Parameter(trajectory[0].clone())
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, default_root_dir=str(root))
    for cb in callbacks:
        cb.setup(trainer, module, "fit")
        cb.on_train_start(trainer, module)
    for step, theta in enumerate(trajectory, start=1):
        module.w.data.copy_(theta)
        trainer.global_step = step
        for cb in callbacks:
            cb.on_train_batch_end(trainer, module, None, None, step - 1)
    for cb in callbacks:
        cb.on_train_end(trainer, module)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A random walk of 64 weights over 2000 steps (start N(0, 1), steps N(0, 0.05^2)): snapshots of sigma_rel 0.05 and
    0.10 every 100 steps, and the averages of other lengths tracked directly (the reference)."""
    root = tmp_path_factory.mktemp("synthetic")
    gen = torch.Generator().manual_seed(0)
    walk = torch.randn(DIM, generator=gen) + (0.05 * torch.randn(STEPS, DIM, generator=gen)).cumsum(0)
    snap = PostHocEMA(sigma_rels=TRACKED, snapshot_every=EVERY, max_snapshots=None, dir=str(root / "posthoc_ema"))
    ref = PostHocEMA(sigma_rels=TRACKED + UNTRACKED, snapshot_every=10 * STEPS, dir=str(root / "ref"), at_end=False)
    _drive([snap, ref], walk, root)
    direct = {s: ref.emas[i][0] for i, s in enumerate(ref.sigma_rels)}
    return {"dir": root / "posthoc_ema", "direct": direct, "final": walk[-1]}


def _error(synthetic, sigma_rel: float) -> tuple[float, float]:
    """(|reconstructed - direct| / |direct|, |reconstructed - direct| / |direct(0.05) - direct(0.10)|)."""
    rec = reconstruct_weights(synthetic["dir"], sigma_rel_to_gamma(sigma_rel))["state_dict"]["w"]
    direct = synthetic["direct"]
    err = (rec - direct[sigma_rel]).norm().item()
    return err / direct[sigma_rel].norm().item(), err / (direct[0.05] - direct[0.10]).norm().item()


def test_snapshots_hold_every_profile_at_every_interval(synthetic):
    found = list_snapshots(synthetic["dir"])
    assert list(found) == list(range(EVERY, STEPS + 1, EVERY))
    info = read_snapshot_info(found[STEPS])
    assert info["t"] == STEPS and info["origin"] == 0 and info["sigma_rels"] == list(TRACKED)
    emas, rest = read_snapshot_tensors(found[STEPS])
    assert len(emas) == 2 and rest == {} and emas[0]["w"].dtype == torch.float32


@pytest.mark.parametrize("sigma_rel", TRACKED)
def test_reconstruction_at_a_tracked_length_is_the_tracked_average(synthetic, sigma_rel):
    """(a) Measured: relative error 0 (the solution is the snapshot itself); required: <= 1e-4."""
    relative, _ = _error(synthetic, sigma_rel)
    assert relative <= 1e-4


@pytest.mark.parametrize("sigma_rel,bound", [(0.07, 5e-4), (0.15, 1e-3), (0.03, 3e-3)])
def test_reconstruction_at_an_untracked_length_matches_a_direct_average(synthetic, sigma_rel, bound):
    """(b) From snapshots of 0.05 and 0.10 every 100 of 2000 steps, at step 2000, measured relative errors
    |reconstructed - direct| / |direct|: 0.07 -> 6.9e-5, 0.15 -> 2.0e-4, 0.03 -> 1.0e-3 (as a fraction of the gap
    between the 0.05 and 0.10 averages: 0.06%, 0.16%, 0.91%; profile residuals 0.25%, 0.58%, 2.6%; coefficient sums
    1.00004, 0.99978, 0.99966). Bounds: 3-7x the measurement (other seeds move it)."""
    relative, of_gap = _error(synthetic, sigma_rel)
    assert relative <= bound and of_gap <= 10 * bound, (relative, of_gap)


def test_lengths_the_snapshots_cannot_express_are_refused_in_one_line(synthetic):
    for sigma_rel in (0.005, 0.29):
        with pytest.raises(ConfigError) as err:
            reconstruct_weights(synthetic["dir"], sigma_rel_to_gamma(sigma_rel))
        line = str(err.value)
        assert "\n" not in line and "tracked sigma_rel 0.05, 0.1" in line and "reconstructable: sigma_rel in [" in line


def test_check_expressible_names_range_when_nothing_fits():
    with pytest.raises(ConfigError, match=r"reconstructable: sigma_rel in \[0\.0\d+, 0\.1\d+\] at step 100$"):
        check_expressible([6.94], [100], sigma_rel_to_gamma(0.2), 100, tracked=[0.1])


# ---------------------------------------------------------------------------------------------- (d) training
QUIET = [
    "callbacks.class_grid.every_n_steps=100000",
    "+callbacks.class_grid.at_end=false",
    "logger=none",
    "callbacks=posthoc",
    "callbacks.posthoc_ema.snapshot_every=2",
    "callbacks.posthoc_ema.max_snapshots=null",
    "trainer.deterministic=true",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny digits run with post-hoc EMA: 4 steps, then resumed from its step-4 checkpoint up to step 6 (a
    checkpoint every step in the second part)."""
    from difflab.pipeline import train

    run = tmp_path_factory.mktemp("posthoc_run")
    train(compose_train(run, tiny_overrides(max_steps=4, save_every=2, extra=QUIET)))
    ckpt = run / "checkpoints" / "step_0000004.ckpt"
    train(compose_train(run, tiny_overrides(max_steps=6, save_every=1, extra=[*QUIET, f"ckpt_path={ckpt}"])))
    return run


def test_power_function_ema_callback_equals_the_tracked_profile_across_a_resume(tmp_path):
    """callbacks.ema.sigma_rel=0.1 averages as post-hoc EMA's tracked 0.1 profile does, step for step, and a resumed
    run continues it (its update count is checkpointed) rather than starting the profile again."""
    from difflab.checkpoints import load_checkpoint
    from difflab.pipeline import train

    power = ["callbacks.ema.decay=null", "callbacks.ema.sigma_rel=0.1", "callbacks.posthoc_ema.sigma_rels=[0.1]"]
    train(compose_train(tmp_path, tiny_overrides(max_steps=3, save_every=3, extra=[*QUIET, *power])))
    ckpt = tmp_path / "checkpoints" / "step_0000003.ckpt"
    train(
        compose_train(tmp_path, tiny_overrides(max_steps=6, save_every=3, extra=[*QUIET, *power, f"ckpt_path={ckpt}"]))
    )
    tracked = read_snapshot_tensors(list_snapshots(tmp_path / "posthoc_ema")[6])[0][0]
    ema = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    assert tracked and max((ema[k].float() - v).abs().max().item() for k, v in tracked.items()) < 1e-5
    raw = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["current_model_state"]
    assert max((ema[k].float() - raw[k].float()).abs().max().item() for k in tracked) > 1e-4  # not the raw weights


def test_training_writes_snapshots_and_resume_continues_them(trained):
    from difflab.checkpoints import load_checkpoint

    snaps = list_snapshots(trained / "posthoc_ema")
    assert list(snaps) == [2, 4, 6]
    state = load_checkpoint(trained / "checkpoints" / "step_0000004.ckpt")["callbacks"]["PostHocEMA"]
    assert state["last_step"] == 4 and state["origin"] == 0 and state["sigma_rels"] == list(TRACKED)
    # the resumed averages = those of step 4 updated with the raw weights of steps 5 and 6 at t = 5, 6
    ema4, _ = read_snapshot_tensors(snaps[4])
    ema6, _ = read_snapshot_tensors(snaps[6])
    raw = {t: load_checkpoint(trained / "checkpoints" / f"step_{t:07d}.ckpt")["current_model_state"] for t in (5, 6)}
    for i, sigma_rel in enumerate(TRACKED):
        gamma = sigma_rel_to_gamma(sigma_rel)
        for name, value in ema4[i].items():
            expect = value.clone()
            for t in (5, 6):
                expect.lerp_(raw[t][name].float(), 1 - power_ema_beta(t, gamma))
            torch.testing.assert_close(ema6[i][name], expect, rtol=1e-5, atol=1e-6)
    assert read_snapshot_info(snaps[6])["t"] == 6


def test_reconstructed_checkpoint_loads_samples_exports_and_sweeps(trained, tmp_path):
    """The command's checkpoint at a tracked length holds that average; sample.py and export.py take it; a -m sweep
    writes one file per value."""
    import reconstruct_ema
    import sample
    from difflab.checkpoints import module_from_checkpoint

    argv = [f"run_dir={trained}", f"hydra.run.dir={tmp_path / 'h'}"]
    assert run_hydra_main(reconstruct_ema.main, [*argv, "sigma_rel=0.1"]) == 0
    out = trained / "posthoc_ema" / "reconstructed" / "sigma_rel_0.1000_step_0000006.ckpt"
    module = module_from_checkpoint(out)
    tracked = read_snapshot_tensors(list_snapshots(trained / "posthoc_ema")[6])[0][1]
    own = module.state_dict()
    assert max((own[k] - v).abs().max().item() for k, v in tracked.items()) < 1e-5  # = the 0.10 average

    assert (
        run_hydra_main(
            sample.main,
            [
                f"ckpt_path={out}",
                "n=4",
                "batch_size=4",
                "device=cpu",
                "sampler.steps=2",
                f"out_dir={tmp_path / 's'}",
                f"hydra.run.dir={tmp_path / 'hs'}",
            ],
        )
        == 0
    )
    assert np.load(tmp_path / "s" / "samples.npz")["images"].shape == (4, 1, 8, 8)
    from difflab.ops.export import export_checkpoint

    assert export_checkpoint(out, tmp_path / "export")["weights"].is_file()  # export.py's path

    sweep = ["-m", f"run_dir={trained}", "sigma_rel=0.06,0.08", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    assert run_hydra_main(reconstruct_ema.main, sweep) == 0
    made = sorted(p.name for p in (trained / "posthoc_ema" / "reconstructed").iterdir())
    assert made == [f"sigma_rel_0.{v}_step_0000006.ckpt" for v in ("0600", "0800", "1000")]
    weights = [module_from_checkpoint(trained / "posthoc_ema" / "reconstructed" / m).state_dict() for m in made[:2]]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ---------------------------------------------------------------------------------------------- (e) bad input
def _one_error_line(capsys, argv) -> str:
    import reconstruct_ema

    capsys.readouterr()
    assert run_hydra_main(reconstruct_ema.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: "), err
    return err


def test_bad_input_is_one_error_line_naming_what_is_available(trained, tmp_path, capsys):
    h = f"hydra.run.dir={tmp_path / 'h'}"
    empty = tmp_path / "no_snapshots"
    empty.mkdir()
    assert "no post-hoc EMA snapshots in" in _one_error_line(capsys, [f"run_dir={empty}", "sigma_rel=0.07", h])
    err = _one_error_line(capsys, [f"run_dir={trained}", "sigma_rel=0.25", h])
    assert "cannot be reconstructed" in err and "tracked sigma_rel 0.05, 0.1" in err and "reconstructable" in err
    assert "(give one)" in _one_error_line(capsys, [f"run_dir={trained}", h])  # the config check, before running
    assert "(give one)" in _one_error_line(capsys, [f"run_dir={trained}", "sigma_rel=0.07", "gamma=7", h])
    err = _one_error_line(capsys, [f"run_dir={trained}", "gamma=7", "step=5", h])
    assert "step=5 has no snapshot" in err and "snapshots at steps 2, 4, 6" in err
    assert _one_error_line(capsys, [f"run_dir={trained}", "sigma_rel=0.5", h]).startswith(
        "error: sigma_rel=0.5 is invalid: a number in (0, 0.3]"
    )
    existing = trained / "posthoc_ema" / "reconstructed" / "taken.ckpt"
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_bytes(b"x")
    assert "exists; pass overwrite=true" in _one_error_line(
        capsys, [f"run_dir={trained}", "sigma_rel=0.07", f"out={existing}", h]
    )
    assert existing.read_bytes() == b"x"


@pytest.mark.slow  # two CPU processes (gloo)
def test_ddp_run_writes_each_snapshot_once_and_it_reconstructs(tmp_path):
    """Under DDP every rank updates its averages and only rank 0 writes: one file per snapshot step, no leftovers,
    and the snapshots reconstruct into a checkpoint that loads."""
    import os
    import subprocess
    import sys

    from difflab.checkpoints import module_from_checkpoint
    from tests.helpers import ROOT

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *tiny_overrides(max_steps=4, save_every=2),
            "callbacks=posthoc",
            "callbacks.posthoc_ema.snapshot_every=2",
            "trainer=ddp_cpu",
            "logger=csv",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert sorted(p.name for p in (run / "posthoc_ema").iterdir()) == [
        "snapshot_0000002.safetensors",
        "snapshot_0000004.safetensors",
    ]
    rec = reconstruct_weights(run / "posthoc_ema", sigma_rel_to_gamma(0.05))
    module = module_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert set(rec["state_dict"]) == set(module.state_dict())
