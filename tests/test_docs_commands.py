"""Documentation that runs: every command in README.md, docs/*.md and the comments of configs/ and docs/examples/ is
validated as a user would run it (``--validate``: composed, every start-time check, nothing written), with its placeholders filled
(tests/docs_commands.py states the convention). A command that fails, or a sweep whose jobs compose to the same run,
fails the test with the file and line it is written at."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.docs_commands import Command, documented_commands
from tests.helpers import ROOT, TEACHER_SETUP, default_teacher_checkpoint, run_hydra_main

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
NEEDS_EXTRA = {"hydra/launcher=slurm": "hydra-submitit-launcher"}  # optional plugins not in the dev extra
CHECKPOINT_KEYS = ("ckpt_path", "init_from", "guide_ckpt", "autoencoder.ckpt_path")
COMMANDS = documented_commands(ROOT)


def _sweep(path: Path) -> Path:
    """A finished ``-m process=vp,edm,flow seed=0,1`` sweep logging what the documented summaries ask for."""
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    (path / "multirun.yaml").write_text(
        yaml.safe_dump({"hydra": {"overrides": {"task": ["process=vp,edm,flow", "seed=0,1"]}}})
    )
    num = 0
    for process in ("vp", "edm", "flow"):
        for seed in (0, 1):
            job = path / str(num)
            (job / ".hydra").mkdir(parents=True)
            (job / "csv").mkdir()
            (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"process={process}", f"seed={seed}"]))
            rows = ["step,val/loss,metrics/fd_digit200,metrics/digit_accuracy"]
            rows += [
                f"{s},{rng.uniform(0.1, 0.3)},{rng.uniform(10, 20)},{rng.uniform(0.9, 1)}"
                for s in (250, 500, 750, 1000)
            ]
            (job / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
            (job / "final_metrics.json").write_text(json.dumps({"status": "completed", "step": 1000, "metrics": {}}))
            num += 1
    return path


def _default_run(run: Path) -> Path:
    """A run directory whose checkpoint holds today's default recipe config (the legacy weights): what a documented
    resume continues."""
    ckpt = default_teacher_checkpoint(run / "checkpoints")
    ckpt.rename(run / "checkpoints" / "last.ckpt")
    return run


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """The working directory the commands run in: a run directory, checkpoints, an export, latent caches and
    shards where the docs write them, and a sweep."""
    root = tmp_path_factory.mktemp("docs")
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"):
        shutil.copy(LEGACY / "last.ckpt", run / "checkpoints" / name)
    (run / "posthoc_ema").mkdir()
    shutil.copytree(LEGACY / "export", root / "export")
    for name in ("digits", "stl10"):
        shutil.copytree(LEGACY / "cache", root / "data" / "latents" / name)
    shutil.copytree(LEGACY / "shards", root / "data" / "latents" / "digits_sh")
    (root / "raw").mkdir()
    return {
        "root": root,
        "run": run,
        "sweep": _sweep(root / "sweep"),
        "teacher": default_teacher_checkpoint(root / "teacher"),
        "resumed_run": _default_run(root / "resumed_run"),
        **{f"teacher_{e}": default_teacher_checkpoint(root / e, o) for e, o in TEACHER_SETUP.items()},
        "teacher_latent": default_teacher_checkpoint(root / "latent", ["+latent=digits"]),
    }


def fill(cmd: Command, place: dict) -> list[str]:
    """The command's arguments with its placeholders filled by what each stands for."""
    root, run = place["root"], place["run"]
    if cmd.entry == "train" and any(a.startswith(("ckpt_path=", "resume=")) for a in cmd.argv):
        run = place["resumed_run"]  # a resume: a run of today's default recipe (its settings must match)
    argv = []
    for arg in cmd.argv:
        if argv[-1:] in (["--config-dir"], ["-cd"]) and not Path(arg).is_absolute():
            argv.append(str(ROOT / arg))  # written for the repository root; the commands run in ``place``
            continue
        arg = arg.replace("[", "").replace("]", "") if re.fullmatch(r"\[[^\]|]+\]", arg) else arg
        key, eq, value = arg.partition("=")
        if cmd.entry == "ablate" and not arg.startswith("-") and "<" in arg:
            argv.append(str(place["sweep"]))
            continue
        if not eq or "<" not in value:
            argv.append(arg)
            continue
        bare = key.lstrip("+~")
        if bare.endswith("teacher_ckpt"):  # a teacher of the default network, or of the one the experiment asks for
            experiment = next((a.partition("=")[2] for a in cmd.argv if a.startswith("experiment=")), "")
            value = str(place.get(f"teacher_{experiment}", place["teacher"]))
            if "+latent=digits" in cmd.argv:  # a student on latents: a teacher of the latent recipe
                value = str(place["teacher_latent"])
        elif re.match(r"<[^>]*>/", value):  # a path under a run directory: <run>/checkpoints/step_<step>.ckpt
            value = re.sub(r"^<[^>]*>", str(run), value)
            if "<" in value:  # a file name with a placeholder: the run's file that matches it
                value = str(next(iter(sorted(run.glob(re.sub(r"<[^>]*>", "*", value[len(str(run)) + 1 :])))), value))
        elif bare.endswith(CHECKPOINT_KEYS) or bare.endswith("ckpt"):
            value = str(run / "checkpoints" / "last.ckpt")
        elif bare.endswith(("run_dir", "hydra.run.dir")):
            value = str(run)
        elif bare.endswith("cache_dir"):
            value = str(root / "data" / "latents" / "digits")
        elif bare.endswith("data_dir"):
            value = str(root / "raw")
        else:  # an output: a fresh directory
            value = str(root / "out" / re.sub(r"\W+", "_", bare))
        argv.append(f"{key}={value}")
    return argv


def run_command(cmd: Command, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the documented entry point in this process with ``--validate``; (exit status, stdout, stderr)."""
    if cmd.entry == "ablate":
        from difflab.ablate import main

        try:
            main([*argv, "--validate"])
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    else:
        module = importlib.import_module(f"difflab.{cmd.entry}")
        code = run_hydra_main(module.main, [*argv, "--validate"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.source for c in COMMANDS])
def test_documented_command_validates(cmd, place, capsys, monkeypatch, forkers_package):
    monkeypatch.chdir(place["root"])
    env = re.match(r"(?:[A-Z_]+=\S+\s+)*", cmd.text).group(0)  # assignments before the command
    for paths in re.findall(r"\bPYTHONPATH=(\S+)", env):  # a forker's own package, relative to the repository root
        for path in (p for p in paths.split(os.pathsep) if p and "$" not in p):
            forkers_package(ROOT / path)
    argv = fill(cmd, place)
    assert "..." not in argv, f"{cmd}: '...' is no placeholder; write the whole command (or <name> for a value)"
    code, out, err = run_command(cmd, argv, capsys)
    extra = next((pkg for flag, pkg in NEEDS_EXTRA.items() if flag in cmd.text), None)
    if extra and not _installed(extra):
        assert code == 2 and f"pip install {extra}" in err, f"{cmd}\n{err[-1500:]}"
        return
    assert code == 0, f"{cmd}\nran as: {cmd.entry} {' '.join(argv)}\n{err[-1500:]}"
    assert "nothing was written" in out


def _installed(package: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(package)
        return True
    except PackageNotFoundError:
        return False


def test_enough_documented_commands_are_found():
    """The collector sees the docs (a broken extractor must not pass by finding nothing)."""
    assert len(COMMANDS) >= 60
    entries = {c.entry for c in COMMANDS}
    assert entries >= {
        "train",
        "sample",
        "export",
        "report",
        "encode_latents",
        "reconstruct_ema",
        "prepare_clips",
        "ablate",
    }
    assert any(c.argv[:1] == ("-m",) for c in COMMANDS)


def test_the_readme_sweep_that_changed_nothing_is_refused_and_its_vp_form_runs(tmp_path, monkeypatch, capsys):
    """`-m schedule=linear,cosine` under the default experiment (flow) would train two identical models: one line,
    exit 2, nothing written; with process=vp the two jobs differ."""
    import difflab.train as train

    monkeypatch.chdir(tmp_path)
    code = run_hydra_main(train.main, ["-m", "schedule=linear,cosine"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1, err
    assert "schedule=linear changes nothing in this run" in err and "add process=vp" in err
    assert not any(tmp_path.iterdir())
    code = run_hydra_main(train.main, ["-m", "process=vp", "schedule=linear,cosine", "--validate"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("valid: job") == 2 and "kind linear" in out and "kind cosine" in out
    assert not any(tmp_path.iterdir())


def test_a_sweep_whose_values_collapse_is_refused_naming_the_jobs(tmp_path, monkeypatch, capsys):
    """Two swept values that compose to the same run (a group option and its own content spelled out)."""
    import difflab.train as train

    monkeypatch.chdir(tmp_path)
    code = run_hydra_main(train.main, ["-m", "model.lr=0.001,1e-3", "--validate"])
    err = capsys.readouterr().err
    assert code == 2 and "jobs 0 and 1 of this sweep compose to the same run" in err, err
    code = run_hydra_main(train.main, ["-m", "seed=0,1", "--validate"])  # replicates are not duplicates
    assert code == 0, capsys.readouterr().err
