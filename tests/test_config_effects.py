"""Overrides that change nothing are refused at start (difflab.config_effects): one line, exit 2, nothing written;
overrides that set a value equal to its default are not inert, and the validate block says what would run."""

from __future__ import annotations

import pytest

from tests.helpers import run_hydra_main


@pytest.fixture
def train_main(tmp_path, monkeypatch):
    import difflab.train as train

    monkeypatch.chdir(tmp_path)
    return lambda argv: run_hydra_main(train.main, argv)


@pytest.mark.parametrize(
    "override, why",
    [
        ("schedule=linear", "the schedule group holds the tables of process=vp, and this run's process is FlowProcess"),
        ("schedule.num_timesteps=500", "the schedule group holds the tables of process=vp"),
        ("objective=eps", "this run's process sets the objective's prediction"),
    ],
)
def test_an_override_the_run_does_not_use_is_refused_in_one_line(train_main, tmp_path, capsys, override, why):
    code = train_main([override])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {override} changes nothing in this run")
    assert why in err
    assert not any(tmp_path.iterdir())  # refused before Hydra wrote the run directory


@pytest.mark.parametrize(
    "overrides",
    [
        ["process=vp", "schedule=linear"],
        ["process=vp", "objective=eps"],
        ["process=flow"],
        ["seed=42"],
        ["sampler=ddim", "sampler.steps=12"],
        ["objective.loss=huber"],
        ["process=vp", "schedule.num_timesteps=500"],
    ],
)
def test_overrides_the_run_uses_validate(train_main, tmp_path, capsys, overrides):
    """Values equal to their default (process=flow, seed=42) are used, not inert."""
    code = train_main([*overrides, "--validate"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "nothing was written (--validate)" in captured.out and not any(tmp_path.iterdir())


def test_validate_block_names_what_would_run(train_main, capsys):
    assert train_main(["process=vp", "schedule=linear", "sampler=ddim", "sampler.steps=12", "--validate"]) == 0
    out = capsys.readouterr().out
    for line in (
        "process:      VPProcess (kind linear",
        "objective:    prediction v",
        "sampler:      ddim (steps 12",
        "denoiser:     UNet2D",
        "precision:    32-true (auto:",
        "output dir:   ",
    ):
        assert line in out, out
    assert train_main(["model.lr=-1", "--validate"]) == 2  # the checks of a real start
    assert "model.lr=-1 is invalid" in capsys.readouterr().err


def test_inert_detection_on_a_composer():
    """The library function: a composition probe per source-group override."""
    from difflab.config_effects import hydra_composer, inert_overrides
    from difflab.configs import CONFIG_DIR

    compose = hydra_composer("train")
    found = inert_overrides(["schedule=linear", "model.lr=1e-3", "sampler.steps=5"], compose, CONFIG_DIR)
    assert [o for o, _ in found] == ["schedule=linear"]
    assert inert_overrides(["process=vp", "schedule=linear"], compose, CONFIG_DIR) == []
