"""What a resume may not change (``difflab.ops.resume.refuse_changed_settings``): settings whose state the restore
brings back from the checkpoint (learning rate, optimizer, LR schedule) and the training method with the settings its
saved state counts in. Refused in one line before anything is written: by the pre-flight on the command line (an
in-place resume's ``.hydra/`` untouched) and by ``pipeline.train`` in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difflab.ops.resume import changed_settings, refuse_changed_settings, stored_run_config
from difflab.utils.errors import ConfigError
from difflab.utils.resolve import MISSING, UNRESOLVED
from tests.helpers import ROOT, compose_train, run_hydra_main, tiny_overrides

LEGACY = ROOT / "tests" / "fixtures" / "legacy" / "last.ckpt"

ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "betas": [0.9, 0.999], "weight_decay": 0.0, "eps": 1e-8}
RESTARTS = {"_target_": "difflab.optim.lr_schedules.LinearRestarts", "period": 2, "final_fraction": 0.0}
PROGRESSIVE = {
    "_target_": "difflab.methods.progressive.ProgressiveDistillation",
    "teacher_ckpt": "teacher.ckpt",
    "teacher_steps": 8,
    "student_steps": 2,
    "steps_per_round": 2,
}


def _model(**changes) -> dict:
    model = {"lr": 1e-3, "optimizer": ADAMW, "lr_schedule": RESTARTS, "method": PROGRESSIVE}
    return {**model, **changes}


def _checkpoint(folder: Path, config: dict | None) -> Path:
    path = folder / "stored.ckpt"
    torch.save({"state_dict": {}, **({"difflab": {"config": config}} if config is not None else {})}, path)
    return path


def _refused(stored: dict, current: dict, raw: dict | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        refuse_changed_settings("resuming run/last.ckpt", stored, current, raw)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lr": 2e-3}, "its run trained with model.lr=0.001 and this run has model.lr=0.002 ("),
        (
            {"optimizer": {**ADAMW, "betas": [0.9, 0.95], "weight_decay": 0.1}},
            "optimizer.betas=[0.9, 0.999] optimizer.weight_decay=0.0 and this run has optimizer.betas=[0.9, 0.95] "
            "optimizer.weight_decay=0.1 (",
        ),
        (  # another class: named alone, not its every key, and the fix is the group's option that builds it
            {"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9}},
            "optimizer._target_=torch.optim.AdamW and this run has optimizer._target_=torch.optim.SGD (",
        ),
        ({"lr_schedule": {**RESTARTS, "period": 3}}, "lr_schedule.period=2 and this run has lr_schedule.period=3"),
        (
            {"method": {**PROGRESSIVE, "teacher_steps": 16}},
            "method.teacher_steps=8 and this run has method.teacher_steps=16 (",
        ),
        (
            {"method": {"_target_": "difflab.methods.base.DiffusionTraining", "adaptive_weighting": False}},
            "method._target_=difflab.methods.progressive.ProgressiveDistillation and this run has "
            "method._target_=difflab.methods.base.DiffusionTraining (",
        ),
    ],
)
def test_a_changed_restored_setting_or_method_is_refused_naming_both_values(changes, message):
    assert message in _refused({"model": _model()}, {"model": _model(**changes)})


def test_the_fix_names_a_group_option_for_a_changed_class_and_every_change_in_one_line():
    """A changed class is fixed by choosing the option that builds it (setting ``_target_`` alone would keep the
    other option's keys); changes of several groups and the seed come in one line, the method first."""
    constant = {"_target_": "difflab.optim.lr_schedules.Constant", "warmup": 0, "start_factor": 0.01}
    line = _refused(
        {"seed": 1, "model": _model()},
        {"seed": 2, "model": _model(lr_schedule=constant, method={**PROGRESSIVE, "steps_per_round": 4})},
    )
    assert line.startswith(
        "resuming run/last.ckpt: its run trained with method.steps_per_round=2 seed=1 "
        "lr_schedule._target_=difflab.optim.lr_schedules.LinearRestarts and this run has method.steps_per_round=4 "
        "seed=2 lr_schedule._target_=difflab.optim.lr_schedules.Constant ("
    ), line
    assert line.endswith(
        "resume with method.steps_per_round=2 seed=1 lr_schedule=linear_restarts, or start a new run "
        "(init_from= keeps the weights)"
    ), line


def test_the_fix_is_one_shell_word_per_override():
    line = _refused({"model": _model()}, {"model": _model(optimizer={**ADAMW, "betas": [0.9, 0.95]})})
    assert "resume with optimizer.betas=[0.9,0.999], or start" in line


def test_a_key_that_only_repeats_a_changed_key_is_not_named_twice():
    """``lr_schedule.period: ${oc.select:method.steps_per_round,null}``: a changed round length changes both; the
    line names the key the user typed."""
    raw = {"lr_schedule": {"period": "${oc.select:method.steps_per_round,null}"}, "method": PROGRESSIVE}
    stored = {"model": _model()}
    current = {"model": _model(method={**PROGRESSIVE, "steps_per_round": 3}, lr_schedule={**RESTARTS, "period": 3})}
    assert [k for k, _, _ in changed_settings(stored, current)] == ["method.steps_per_round", "lr_schedule.period"]
    assert changed_settings(stored, current, raw) == [("method.steps_per_round", 2, 3)]


@pytest.mark.parametrize(
    "stored, current",
    [
        ({"model": _model()}, {"model": _model()}),  # the same settings
        # settings the saved state does not count in: the teacher's file, the budget
        (
            {"model": _model(), "trainer": {"max_steps": 4}},
            {"model": _model(method={**PROGRESSIVE, "teacher_ckpt": "moved.ckpt"}), "trainer": {"max_steps": 8}},
        ),
        # a checkpoint of an older layout: nodes or keys it lacks are not compared
        ({"model": {"lr": 1e-3}}, {"seed": 3, "model": _model()}),
        ({"model": _model(optimizer={k: v for k, v in ADAMW.items() if k != "eps"})}, {"model": _model()}),
        # values this run cannot resolve before it starts are not compared
        ({"model": _model()}, {"model": _model(lr=UNRESOLVED, optimizer={**ADAMW, "eps": MISSING})}),
        # a user's own method class that cannot be looked up: compared by its class name only
        (
            {"model": _model(method={"_target_": "mine.Method", "n": 1})},
            {"model": _model(method={"_target_": "mine.Method", "n": 2})},
        ),
        (None, {"model": _model(lr=5.0)}),  # a checkpoint without a run config (not difflab's): nothing to compare
    ],
)
def test_what_a_resume_may_change_or_cannot_compare_resumes(stored, current):
    refuse_changed_settings("resuming run/last.ckpt", stored, current)


def test_the_stored_config_is_read_from_the_file_in_todays_layout_and_an_unreadable_file_is_left_to_others(tmp_path):
    path = _checkpoint(tmp_path, {"model": _model()})
    assert stored_run_config(path)["model"]["lr"] == 1e-3
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(path.read_bytes()[:40])
    assert stored_run_config(broken) is None and stored_run_config(tmp_path) is None
    assert stored_run_config(_checkpoint(tmp_path, None)) is None
    legacy = stored_run_config(LEGACY)  # flat DiffusionModule keys of before the optimizer / lr_schedule groups
    assert legacy["model"]["optimizer"]["_target_"] == "torch.optim.AdamW" and "lr_schedule" in legacy["model"]


RUN = [*tiny_overrides(max_steps=4, save_every=2), "guidance.interval=null", "logger=csv"]  # conftest's run_dir


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    """A copy of conftest's tiny run: a test that resumed it by mistake would not change the shared one."""
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.mark.parametrize(
    "change, named",
    [
        (
            ["lr_schedule=constant", "ckpt_path=last"],
            "lr_schedule._target_=difflab.optim.lr_schedules.WarmupCosine and this run has",
        ),
        (["model.lr=0.5", "resume=auto"], "model.lr=0.002 and this run has model.lr=0.5"),
        (["optimizer.weight_decay=0.1", "ckpt_path=last"], "resume with optimizer.weight_decay=0.0, or start"),
    ],
)
def test_an_in_place_resume_with_a_changed_setting_stops_before_hydra_rewrites_the_run(run_copy, capsys, change, named):
    """``ckpt_path=last`` / ``resume=auto`` with ``hydra.run.dir=<run>`` and a changed setting: exit 2 with the one
    line, and no file of the run (``.hydra/``, logs, checkpoints) rewritten."""
    import train

    before = {p: p.stat().st_mtime_ns for p in run_copy.rglob("*")}
    capsys.readouterr()
    code = run_hydra_main(train.main, [*RUN, "trainer.max_steps=6", *change, f"hydra.run.dir={run_copy}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith(f"error: resuming {run_copy / 'checkpoints'}"), lines
    assert named in lines[-1], lines[-1]
    assert "resume with lr_schedule=warmup_cosine" in lines[-1] or "lr_schedule" not in change[0]
    assert {p: p.stat().st_mtime_ns for p in run_copy.rglob("*")} == before


def test_the_fix_names_an_option_of_the_users_own_config_dir(run_copy, tmp_path, capsys):
    """A run composed with ``--config-dir`` whose checkpoint was trained with a group option from that directory: the
    fix names that option, found where Hydra searched (``hydra.runtime.config_sources``)."""
    import train

    ckpt = run_copy / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["difflab"]["config"]["model"]["lr_schedule"] = {"_target_": "mylab.schedules.Plateau", "patience": 3}
    torch.save(state, ckpt)
    user = tmp_path / "my_configs"
    (user / "lr_schedule").mkdir(parents=True)
    (user / "lr_schedule" / "plateau.yaml").write_text("_target_: mylab.schedules.Plateau\npatience: 3\n")
    capsys.readouterr()
    argv = ["--config-dir", str(user), *RUN, "trainer.max_steps=6", "ckpt_path=last", f"hydra.run.dir={run_copy}"]
    assert run_hydra_main(train.main, argv) == 2
    assert "resume with lr_schedule=plateau, or start" in capsys.readouterr().err


def test_a_user_option_that_a_package_option_of_the_same_name_hides_is_not_offered(tmp_path):
    """Hydra takes the first ``lr_schedule/constant.yaml`` in its search order, the package's: a user's file of that
    name is never composed, so the fix names the class instead of an option that would build another one."""
    from difflab.configs import CONFIG_DIR

    user = tmp_path / "my_configs"
    (user / "lr_schedule").mkdir(parents=True)
    (user / "lr_schedule" / "constant.yaml").write_text("_target_: mylab.schedules.Plateau\n")
    mine = {"_target_": "mylab.schedules.Plateau"}
    with pytest.raises(ConfigError) as err:
        refuse_changed_settings(
            "resuming run", {"model": _model(lr_schedule=mine)}, {"model": _model()}, None, [Path(CONFIG_DIR), user]
        )
    assert "resume with lr_schedule._target_=mylab.schedules.Plateau, or start" in str(err.value)


def test_a_refused_sweep_job_keeps_the_hydra_files_of_the_run_it_would_resume(run_dir, tmp_path, capsys):
    """Hydra rewrites a sweep job's ``.hydra/`` and the sweep's ``multirun.yaml`` before any callback sees the job:
    a job refused at resume gets the earlier run's files back (logs may grow); the same sweep without the change
    then resumes and writes its own."""
    import shutil

    import train

    sweep = tmp_path / "sweep"
    shutil.copytree(run_dir, sweep / "0")
    (sweep / "multirun.yaml").write_text("# the sweep that trained job 0\n")

    def kept() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file() and p.suffix != ".log"}

    before = kept()
    argv = ["-m", *RUN, "trainer.max_steps=6", "ckpt_path=last", f"hydra.sweep.dir={sweep}"]
    code = run_hydra_main(train.main, [*argv, "model.lr=0.5"])
    assert code != 0 and "model.lr=0.002 and this run has model.lr=0.5" in capsys.readouterr().err
    assert kept() == before
    assert run_hydra_main(train.main, argv) == 0
    assert kept()[sweep / "multirun.yaml"] != before[sweep / "multirun.yaml"]
    assert (sweep / "0" / "checkpoints" / "step_0000006.ckpt").is_file()
    assert "model.lr=0.5" not in (sweep / "0" / ".hydra" / "overrides.yaml").read_text()


def test_a_later_sweep_job_refused_gets_its_own_files_back_and_the_sweep_keeps_its_multirun_yaml(run_dir, tmp_path):
    """Job 0 resumes and writes its files; job 1, refused, gets its earlier run's ``.hydra/`` back, while the sweep's
    ``multirun.yaml`` is this sweep's (a job of it ran)."""
    import shutil

    import train

    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        shutil.copytree(run_dir, sweep / job)
    (sweep / "multirun.yaml").write_text("# the sweep that trained jobs 0 and 1\n")
    job1 = {p: p.read_bytes() for p in (sweep / "1" / ".hydra").iterdir()}
    argv = ["-m", *RUN, "trainer.max_steps=6", "ckpt_path=last", "model.lr=0.002,0.5", f"hydra.sweep.dir={sweep}"]
    assert run_hydra_main(train.main, argv) == 2
    assert (sweep / "0" / "checkpoints" / "step_0000006.ckpt").is_file()
    assert {p: p.read_bytes() for p in (sweep / "1" / ".hydra").iterdir()} == job1
    assert not (sweep / "1" / "checkpoints" / "step_0000006.ckpt").exists()
    assert "model.lr=0.002,0.5" in (sweep / "multirun.yaml").read_text()


def test_an_in_process_resume_is_refused_before_loggers_or_checkpoints_write(run_dir, tmp_path):
    """``pipeline.train`` (no Hydra callback) applies the same rule before building anything."""
    from difflab.pipeline import train

    out = tmp_path / "resumed"
    cfg = compose_train(out, [*RUN, "model.lr=0.5", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"])
    with pytest.raises(ConfigError, match=r"model\.lr=0\.002 and this run has model\.lr=0\.5"):
        train(cfg)
    assert not out.exists() or [p.name for p in out.rglob("*") if p.is_file()] in ([], [".difflab.lock"])


def test_a_fit_outside_the_pipeline_meets_the_same_rule_when_lightning_restores(run_dir, tmp_path):
    """``build`` + ``trainer.fit(ckpt_path=...)`` (a notebook, Lightning's own requeue) skips ``pipeline.train``:
    the module refuses the checkpoint as Lightning hands it over, before a step."""
    from difflab.pipeline import build

    objs = build(compose_train(tmp_path / "fit", [*RUN, "logger=none", "optimizer.weight_decay=0.1"]))
    with pytest.raises(ConfigError, match=r"^ckpt_path: its run trained with optimizer\.weight_decay=0\.0 and"):
        objs["trainer"].fit(
            objs["model"], datamodule=objs["datamodule"], ckpt_path=run_dir / "checkpoints" / "last.ckpt"
        )
    assert objs["trainer"].global_step == 0


def test_a_module_built_without_the_pipeline_compares_its_own_methods_settings():
    """``DiffusionModule`` built by hand (no ``run_config``): the last guard compares its method's class and
    ``fixed_on_resume`` values with the checkpoint run's, so a progressive student still cannot resume other rounds."""
    from types import SimpleNamespace

    from difflab.lit_modules.diffusion_module import DiffusionModule
    from difflab.methods.progressive import ProgressiveDistillation

    own = DiffusionModule._method_config(SimpleNamespace(method=ProgressiveDistillation("t.ckpt", 16, 2, 2)))
    assert own["model"]["method"] == {
        "_target_": "difflab.methods.progressive.ProgressiveDistillation",
        "teacher_steps": 16,
        "student_steps": 2,
        "steps_per_round": 2,
    }
    assert "method.teacher_steps=8 and this run has method.teacher_steps=16" in _refused({"model": _model()}, own)


def test_an_autoencoder_run_meets_the_same_rule(tmp_path, capsys):
    """An autoencoder run (``experiment=digits_vae``) builds its own Adam from ``model.lr`` / ``betas`` /
    ``weight_decay``, whose param groups a resume restores: a changed one is refused in one line before any file of the
    run changes, and the same resume without the change continues."""
    import train

    run = tmp_path / "vae"
    tiny = ["autoencoder.base_channels=8", "autoencoder.channel_mults=[1,2]", "datamodule.batch_size=32"]
    base = ["experiment=digits_vae", *tiny, "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=2"]
    base += ["trainer.val_check_interval=1000000", "trainer.limit_val_batches=1", "~callbacks.progress_bar"]
    base += ["trainer.enable_progress_bar=false", "logger=csv", f"hydra.run.dir={run}"]
    assert run_hydra_main(train.main, base) == 0
    assert stored_run_config(run / "checkpoints" / "last.ckpt")["model"]["lr"] == 1e-3

    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    for change, named in [
        ("model.lr=0.5", "model.lr=0.001 and this run has model.lr=0.5"),
        ("model.betas=[0.9,0.99]", "resume with model.betas=[0.5,0.9]"),
        ("model.weight_decay=0.1", "model.weight_decay=0.0 and this run has model.weight_decay=0.1"),
    ]:
        code = run_hydra_main(train.main, [*base, "trainer.max_steps=4", change, "ckpt_path=last"])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and named in line, line
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert run_hydra_main(train.main, [*base, "trainer.max_steps=4", "ckpt_path=last"]) == 0
    assert (run / "checkpoints" / "step_0000004.ckpt").is_file()
