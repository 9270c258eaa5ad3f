"""Fixtures shared by several test modules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def squeeze_backbone(tmp_path_factory):
    """A randomly initialised torchvision squeezenet1_1 state dict: the on-disk format of the real LPIPS backbone."""
    from torchvision.models import squeezenet1_1

    path = tmp_path_factory.mktemp("lpips") / "squeezenet1_1-b8a52dc0.pth"
    torch.manual_seed(0)
    torch.save(squeezenet1_1(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`python train.py` (in-process, real Hydra CLI parsing) on tiny digits: 4 steps, a checkpoint and a grid every
    2 steps, CSV logs; one run per test module that asks for it. Guided at both of its two sampling steps (neither
    falls inside the digits recipe's guidance interval)."""
    import train
    from tests.helpers import run_hydra_main, tiny_overrides

    out = tmp_path_factory.mktemp("train_run")
    code = run_hydra_main(
        train.main,
        [*tiny_overrides(max_steps=4, save_every=2), "guidance.interval=null", "logger=csv", f"hydra.run.dir={out}"],
    )
    assert code == 0
    return out


@pytest.fixture
def forkers_package(monkeypatch):
    """``use(path)``: a package kept outside difflab importable for one test, as ``PYTHONPATH=path`` makes it; its
    modules and the guidance methods it registers are forgotten afterwards, so no other test sees them."""
    from difflab.diffusion import guidance

    monkeypatch.setattr(guidance, "GUIDANCE_METHODS", dict(guidance.GUIDANCE_METHODS))
    packages: set[str] = set()

    def use(path: Path) -> None:
        monkeypatch.syspath_prepend(str(path))
        packages.update(p.name for p in Path(path).iterdir() if (p / "__init__.py").is_file())

    yield use
    for name in [m for m in sys.modules if m.split(".")[0] in packages]:
        del sys.modules[name]
