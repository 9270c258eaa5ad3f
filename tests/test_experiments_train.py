"""A few training steps of the research recipes on tiny datasets in their real on-disk formats (issue 4)."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from difflab.pipeline import train
from tests.helpers import compose_train
from tests.test_image_datamodules import write_cifar10, write_stl10

torch.set_num_threads(1)

# Shrink the recipes' networks and loops; everything else (schedule, objective, guidance, EMA, callbacks) stays.
SMALL = [
    "trainer=cpu",
    "trainer.precision=32-true",
    "trainer.max_steps=2",
    "trainer.accumulate_grad_batches=1",
    "trainer.val_check_interval=1000000",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.progress_bar",
    "logger=csv",
    "model.net.base_channels=8",
    "model.net.channel_mults=[1,2]",
    "model.net.attention_levels=[1]",
    "model.net.num_res_blocks=1",
    "model.net.groups=4",
    "model.net.head_dim=8",
    "sampler.steps=2",
    "callbacks.class_grid.every_n_steps=2",
    "callbacks.class_grid.n_cols=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "datamodule.batch_size=2",
    "datamodule.num_workers=0",
    "datamodule.persistent_workers=false",
    "datamodule.pin_memory=false",
]


def _fit(tmp_path: Path, experiment: str, data_dir: Path, extra=()):
    cfg = compose_train(tmp_path / "run", [f"experiment={experiment}", f"paths.data_dir={data_dir}", *SMALL, *extra])
    objs = train(cfg)
    assert objs["trainer"].global_step == 2
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    return cfg, objs


def test_stl10_vpred_cfg_trains_on_stl10_binaries(tmp_path):
    write_stl10(tmp_path / "data", n_train=6, n_test=4, n_unl=4)
    cfg, objs = _fit(
        tmp_path,
        "stl10_vpred_cfg",
        tmp_path / "data",
        [
            "datamodule.image_size=16",
            "datamodule.verify=none",
            "callbacks.class_grid_cfg6.every_n_steps=2",
            "callbacks.class_grid_cfg6.n_cols=2",
        ],
    )
    m = objs["model"]
    d = m.diffusion
    assert d.objective.prediction == "v" and d.process.num_timesteps == 500 and d.p_uncond == 0.2
    assert d.guidance.scale == 3.0 and d.sample_shape == (3, 16, 16)
    grids = tmp_path / "run" / "figures"
    assert (grids / "class_grid" / "step_0000002.png").is_file()
    assert (grids / "class_grid_cfg6" / "step_0000002.png").is_file()  # the log's second guidance scale


def test_stl10_finetune_starts_from_a_base_checkpoint(tmp_path):
    write_stl10(tmp_path / "data", n_train=6, n_test=4, n_unl=4)
    _fit(
        tmp_path / "base", "stl10_vpred_cfg", tmp_path / "data", ["datamodule.image_size=16", "datamodule.verify=none"]
    )
    base = tmp_path / "base" / "run" / "checkpoints" / "last.ckpt"
    cfg, objs = _fit(
        tmp_path,
        "stl10_finetune",
        tmp_path / "data",
        ["datamodule.image_size=16", "datamodule.verify=none", f"init_from={base}"],
    )
    assert objs["model"].lr == 2e-5
    assert list((tmp_path / "run" / "checkpoints").glob("finetune_step_*.ckpt"))


def test_cifar10_ddim_trains_on_cifar_pickles(tmp_path):
    write_cifar10(tmp_path / "data")
    cfg, objs = _fit(
        tmp_path, "cifar10_ddim", tmp_path / "data", ["datamodule.image_size=16", "datamodule.verify=none"]
    )
    m = objs["model"]
    assert m.diffusion.objective.prediction == "eps" and m.diffusion.sample_shape == (3, 16, 16)
    assert m.diffusion.sampler.func.__name__ == "ddim" and m.diffusion.sampler.keywords["steps"] == 2


def test_image_folder_datamodule_trains(tmp_path):
    for cls in ("cat", "dog"):
        d = tmp_path / "data" / "pets" / cls
        d.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 24), (40 * i, 100, 200 if cls == "dog" else 0)).save(d / f"{i}.png")
    cfg, objs = _fit(
        tmp_path,
        "digits",
        tmp_path / "data",
        [
            "datamodule=image_folder",
            f"datamodule.data_dir={tmp_path / 'data' / 'pets'}",
            "datamodule.image_size=16",
            "model.net.in_channels=3",
        ],
    )
    assert objs["model"].diffusion.sample_shape == (3, 16, 16) and objs["model"].diffusion.class_names == ["cat", "dog"]


@pytest.mark.parametrize("experiment", ["stl10_vpred_cfg", "cifar10_ddim"])
def test_missing_dataset_fails_with_where_and_how(tmp_path, experiment):
    from difflab.utils.errors import DataNotFoundError

    cfg = compose_train(tmp_path / "run", [f"experiment={experiment}", f"paths.data_dir={tmp_path}", *SMALL])
    with pytest.raises(DataNotFoundError, match="download"):
        train(cfg)
