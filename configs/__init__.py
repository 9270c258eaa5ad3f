"""difflab's Hydra configs, shipped inside the package (``difflab.configs``) so the console commands find them from
any directory. ``CONFIG_DIR`` is their folder on disk; Hydra reads them as ``pkg://difflab.configs``."""

import os
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent
CONFIG_PATH = "pkg://difflab.configs"

# ${cwd:} is the directory the command was started in. Unlike ${hydra:runtime.cwd} it resolves before Hydra's
# runtime config exists, which a multirun's sweep directory (under paths.log_dir) needs.
if not OmegaConf.has_resolver("cwd"):
    OmegaConf.register_new_resolver("cwd", os.getcwd)
