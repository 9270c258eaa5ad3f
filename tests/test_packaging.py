"""The package as users install it: `import difflab`, configs shipped inside it, console commands, light imports."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

COMMANDS = {
    "difflab-train": "difflab.train:main",
    "difflab-sample": "difflab.sample:main",
    "difflab-export": "difflab.export:main",
    "difflab-report": "difflab.report:main",
    "difflab-encode-latents": "difflab.encode_latents:main",
    "difflab-reconstruct-ema": "difflab.reconstruct_ema:main",
    "difflab-ablate": "difflab.ablate:main",
    "difflab-prepare-clips": "difflab.prepare_clips:main",
}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_code_folder_is_a_listed_package():
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    folders = {
        "difflab" + ("." + ".".join(p.parent.relative_to(ROOT / "src").parts) if p.parent != ROOT / "src" else "")
        for p in (ROOT / "src").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert folders <= listed, f"add to [tool.setuptools] packages: {sorted(folders - listed)}"
    assert pyproject()["project"]["scripts"] == COMMANDS


def test_importing_difflab_and_its_entry_modules_loads_neither_torch_nor_lightning():
    code = (
        "import sys, difflab, difflab.train, difflab.sample, difflab.export, difflab.report, "
        "difflab.encode_latents, difflab.reconstruct_ema, difflab.ablate, difflab.prepare_clips, difflab.configs; "
        "heavy = [m for m in ('torch', 'lightning') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True).stdout
    assert out.strip() == "[]"  # so --help and --cfg answer without paying for torch


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A regular (non-editable) install of this checkout's wheel into a fresh folder, without dependencies."""
    tmp = tmp_path_factory.mktemp("pkg")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp / "dist").glob("difflab-*.whl"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-compile",
            "--target",
            str(tmp / "site"),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    return {"wheel": wheel, "site": tmp / "site", "cwd": tmp_path_factory.mktemp("elsewhere")}


def test_wheel_ships_configs_classifier_weights_and_commands(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for path in ROOT.joinpath("configs").rglob("*.yaml"):
        assert f"difflab/configs/{path.relative_to(ROOT / 'configs').as_posix()}" in names
    assert "difflab/eval/digit_classifier.pt" in names and "difflab/train.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()
    assert all(f"{cmd} = {target}" in text for cmd, target in COMMANDS.items())
    assert not any(n.startswith("src/") for n in names)  # no top-level `src` package to collide with


def run_installed(installed, *args: str) -> subprocess.CompletedProcess:
    """Run Python from another directory with only the installed copy of difflab on the path."""
    env = {**os.environ, "PYTHONPATH": str(installed["site"])}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=installed["cwd"], env=env, timeout=600
    )


def test_installed_copy_is_what_imports_and_trains_from_another_directory(installed):
    r = run_installed(
        installed, "-c", "import difflab, difflab.configs; print(difflab.__file__); print(difflab.configs.CONFIG_DIR)"
    )
    assert r.returncode == 0, r.stderr
    module_file, config_dir = r.stdout.split()
    assert Path(module_file).is_relative_to(installed["site"]) and Path(config_dir).is_relative_to(installed["site"])
    r = run_installed(installed, "-m", "difflab.train", "debug=fast", "logger=csv", "trainer.enable_progress_bar=false")
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((installed["cwd"] / "logs" / "train" / "runs").iterdir())  # outputs under the current directory
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "last.ckpt").is_file()
