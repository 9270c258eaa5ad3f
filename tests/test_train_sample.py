"""End to end through the real Hydra entry points: train.py (a few steps), sample.py, config composition, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from difflab.checkpoints import load_checkpoint, module_from_checkpoint
from tests.helpers import CONFIG_DIR, compose_train, run_hydra_main

torch.set_num_threads(1)

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def test_training_writes_checkpoints_grids_and_config(run_dir):
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"]
    grids = sorted(p.name for p in (run_dir / "figures" / "class_grid").iterdir())
    assert grids == ["final.png", "step_0000002.png", "step_0000004.png"]
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "csv" / "metrics.csv").is_file()


def test_checkpoint_loads_weights_only_and_ema_differs_from_raw(run_dir):
    path = run_dir / "checkpoints" / "step_0000004.ckpt"
    ck = torch.load(path, map_location="cpu", weights_only=True)  # plain torch, the safe way
    assert ck["global_step"] == 4
    cfg = ck["difflab"]["config"]
    assert cfg["model"]["net"]["base_channels"] == 8 and cfg["model"]["diffusion"]["sample_shape"] == [1, 8, 8]
    ema, raw = ck["state_dict"], ck["current_model_state"]
    assert ema.keys() == raw.keys()
    assert max((ema[k].float() - raw[k].float()).abs().max().item() for k in ema) > 1e-5


def test_sample_cli_outputs_and_samples_from_ema_weights(run_dir, tmp_path, monkeypatch):
    import difflab.sampling as sampling
    import sample
    from difflab.checkpoints import load_state_dict_checked

    ckpt = run_dir / "checkpoints" / "step_0000004.ckpt"
    module = module_from_checkpoint(ckpt)
    ck = load_checkpoint(ckpt)
    assert all(torch.equal(module.state_dict()[k], ck["state_dict"][k]) for k in ck["state_dict"])  # EMA loaded

    args = [f"ckpt_path={ckpt}", "n=20", "batch_size=8", "device=cpu", "sampler.steps=2"]
    assert run_hydra_main(sample.main, [*args, f"out_dir={tmp_path / 'ema'}", f"hydra.run.dir={tmp_path / 'h1'}"]) == 0
    out = np.load(tmp_path / "ema" / "samples.npz")
    assert sorted(out.files) == ["images", "labels"]
    assert out["images"].dtype == np.uint8 and out["images"].shape == (20, 1, 8, 8)
    assert out["labels"].dtype == np.int64 and out["labels"].shape == (20,)
    assert np.bincount(out["labels"], minlength=10).tolist() == [2] * 10  # balanced over the 10 classes
    assert (tmp_path / "ema" / "grid.png").is_file()

    # the same sampling with the raw weights gives other images: sample.py used the EMA ones
    def raw_module(path):
        m = module_from_checkpoint(path)
        load_state_dict_checked(m, load_checkpoint(path)["current_model_state"])
        return m

    monkeypatch.setattr(sampling, "module_from_checkpoint", raw_module)
    assert run_hydra_main(sample.main, [*args, f"out_dir={tmp_path / 'raw'}", f"hydra.run.dir={tmp_path / 'h2'}"]) == 0
    raw = np.load(tmp_path / "raw" / "samples.npz")
    assert np.array_equal(raw["labels"], out["labels"]) and not np.array_equal(raw["images"], out["images"])


def _sample_error(tmp_path, capsys, ckpt: Path) -> str:
    import sample

    capsys.readouterr()
    code = run_hydra_main(
        sample.main,
        [f"ckpt_path={ckpt}", "n=2", "device=cpu", f"out_dir={tmp_path / 'o'}", f"hydra.run.dir={tmp_path / 'h'}"],
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_sample_cli_missing_or_corrupt_checkpoint_fails_in_one_line_naming_the_path(run_dir, tmp_path, capsys):
    missing = tmp_path / "missing.ckpt"
    assert _sample_error(tmp_path, capsys, missing) == f"error: checkpoint not found: {missing} (check ckpt_path)"
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    err = _sample_error(tmp_path, capsys, corrupt)
    assert err.startswith(f"error: cannot read checkpoint {corrupt}: corrupt or truncated")


def test_checkpoint_of_another_architecture_lists_mismatched_keys(run_dir, tmp_path, capsys):
    ck = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    ck["difflab"]["config"]["model"]["net"]["base_channels"] = 16  # config of a wider net, weights of the small one
    other = tmp_path / "other_arch.ckpt"
    torch.save(ck, other)
    err = _sample_error(tmp_path, capsys, other)
    assert f"{other} does not match the model architecture" in err
    assert "shape-mismatched" in err and "vs model" in err and "denoiser." in err


# ---------------------------------------------------------------------------------------------- config composition
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name, tmp_path):
    from types import SimpleNamespace

    from difflab.pipeline import fill_from_datamodule

    cfg = compose_train(tmp_path, [f"experiment={name}"])
    # what the pipeline copies from the datamodule (a stand-in: the real datasets are not on this machine)
    fill_from_datamodule(
        cfg, SimpleNamespace(sample_shape=(3, 4, 8, 8), num_classes=10, class_names=None, prompts=None)
    )
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for key in ("datamodule", "model", "trainer", "callbacks"):
        assert "_target_" in resolved[key] or key == "callbacks"
    assert resolved["paths"]["output_dir"] == str(tmp_path)


def test_glob_sweep_over_experiments_expands_to_every_experiment():
    """``-m experiment=glob(*)``: Hydra's own sweep expansion lists every experiment, and each composes (above)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        override = OverridesParser.create(config_loader=loader).parse_overrides(["experiment=glob(*)"])[0]
        assert sorted(override.sweep_string_iterator()) == EXPERIMENTS


@pytest.mark.parametrize("group,bad", [("trainer", "tpu_pod"), ("logger", "mlflw")])
def test_unknown_config_option_fails_with_the_valid_choices(group, bad, tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        compose_train(tmp_path, [f"{group}={bad}"])
    msg = str(err.value)
    assert f"'{group}/{bad}'" in msg and "Available options" in msg
    expected = {"trainer": ["cpu", "ddp", "ddp_cpu", "gpu"], "logger": ["csv", "wandb", "tensorboard"]}[group]
    assert all(f"\t{opt}\n" in msg + "\n" for opt in expected)


def test_trainer_configs_compose_with_their_hardware_settings(tmp_path):
    got = {}
    for name in ("cpu", "gpu", "ddp", "ddp_cpu"):
        t = compose_train(tmp_path, [f"trainer={name}"]).trainer
        got[name] = (t.accelerator, t.devices, t.strategy, t.precision, t.num_nodes)
    assert got == {
        "cpu": ("cpu", 1, "auto", "auto", 1),
        "gpu": ("gpu", 1, "auto", "auto", 1),
        "ddp": ("gpu", -1, "ddp", "auto", 1),
        "ddp_cpu": ("cpu", 2, "ddp", "auto", 1),
    }
    t = compose_train(tmp_path, ["trainer=ddp", "trainer.num_nodes=4", "trainer.devices=8"]).trainer
    assert (t.num_nodes, t.devices) == (4, 8)


def test_disabling_the_progress_bar_from_the_trainer_config_drops_the_bar_callback(tmp_path):
    from lightning.pytorch.callbacks import ProgressBar

    from difflab.pipeline import build

    on = build(compose_train(tmp_path / "on", ["logger=none"]))["trainer"]  # the default callbacks hold a bar
    assert any(isinstance(cb, ProgressBar) for cb in on.callbacks)
    off = build(compose_train(tmp_path / "off", ["logger=none", "trainer.enable_progress_bar=false"]))["trainer"]
    assert not any(isinstance(cb, ProgressBar) for cb in off.callbacks)


def test_console_run_prints_each_lightning_line_once(tmp_path):
    """Lightning is imported lazily (after Hydra configured logging); its own console handler must not double every
    line on the console or in train.log (a DDP test counts these lines)."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "difflab.train", "debug=fast", "logger=csv", "trainer.enable_progress_bar=false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (r.stdout + r.stderr).count("GPU available") == 1
    log_file = next((tmp_path / "logs" / "train" / "runs").glob("*/train.log"))
    assert log_file.read_text().count("GPU available") == 1
