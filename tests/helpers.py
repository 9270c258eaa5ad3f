"""Helpers shared by the tests: the repository root, tiny-model overrides and running a Hydra entry point in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from difflab.configs import CONFIG_DIR  # noqa: F401 - tests take it from here
from difflab.utils.compose import compose_train  # noqa: F401 - tests take it from here

ROOT = Path(__file__).resolve().parents[1]  # the source checkout

# A model and schedule small enough for CPU tests: 8x8 digits, two UNet levels of 8/16 channels, no attention.
TINY = [
    "datamodule.image_size=8",
    "datamodule.batch_size=64",
    "model.net.base_channels=8",
    "model.net.channel_mults=[1,2]",
    "model.net.attention_levels=[]",
    "model.net.groups=4",
    "sampler.steps=2",
    "callbacks.class_grid.n_cols=2",
    "~callbacks.progress_bar",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=1000000",
    "trainer.limit_val_batches=1",
]


def tiny_overrides(max_steps: int = 4, save_every: int = 2, extra: Sequence[str] = ()) -> list[str]:
    """CLI-style overrides for a tiny CPU run of ``max_steps`` steps saving a checkpoint + grid every ``save_every``."""
    return TINY + [
        f"trainer.max_steps={max_steps}",
        f"callbacks.model_checkpoint.every_n_train_steps={save_every}",
        f"callbacks.class_grid.every_n_steps={save_every}",
        *extra,
    ]


def run_hydra_main(main, argv: Sequence[str]) -> int:
    """Run a ``@hydra.main`` entry point in this process with command-line ``argv``; returns its exit status.

    Hydra finds ``config_path`` relative to the script file only when it believes the script is ``__main__``.
    """
    import inspect
    import os
    import sys

    old, old_env = sys.argv, os.environ.get("HYDRA_MAIN_MODULE")
    sys.argv = [inspect.getfile(inspect.unwrap(main)), *argv]
    os.environ["HYDRA_MAIN_MODULE"] = "__main__"
    try:
        main()
        return 0
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = old
        if old_env is None:
            os.environ.pop("HYDRA_MAIN_MODULE", None)
        else:
            os.environ["HYDRA_MAIN_MODULE"] = old_env


# experiments whose teacher is the digits recipe trained with these overrides (as their config files say)
TEACHER_SETUP = {"digits_scm": ["process.time_scale=1"], "digits_scm_guided": ["process.time_scale=1"]}


def default_teacher_checkpoint(folder: Path, overrides: Sequence[str] = ()) -> Path:
    """A checkpoint whose stored config is the default digits recipe's model and data (the committed legacy checkpoint
    with those two sections replaced; ``overrides`` change the recipe first): a distillation command's teacher as the
    pre-flight reads it (its weights are the tiny legacy ones, so only checks that read the config pass it)."""
    import torch
    from omegaconf import OmegaConf

    ckpt = torch.load(ROOT / "tests" / "fixtures" / "legacy" / "last.ckpt", weights_only=True)
    default = compose_train(folder / "composed", list(overrides))
    for key in ("model", "datamodule"):  # unfilled values (the class count) stay ???, as in the composed config
        ckpt["difflab"]["config"][key] = OmegaConf.to_container(default[key], resolve=True, throw_on_missing=False)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, folder / "teacher.ckpt")
    return folder / "teacher.ckpt"


def assert_resumed_equal(final: dict, again: dict, atol: float = 1e-6) -> None:
    """Two checkpoints of the same step, one from a run resumed midway: equal weights and equal method state (a
    learned loss weighting included), key by key."""
    import torch

    assert final["state_dict"].keys() == again["state_dict"].keys()
    for k, v in final["state_dict"].items():
        assert torch.allclose(v, again["state_dict"][k], atol=atol), k
    weighting = final.get("difflab_method", {}).get("weighting", {})
    assert weighting.keys() == again.get("difflab_method", {}).get("weighting", {}).keys()
    for k, v in weighting.items():
        assert torch.allclose(v, again["difflab_method"]["weighting"][k], atol=atol), k
