"""difflab's Hydra configs, shipped inside the package (``difflab.configs``) so the console commands find them from
any directory. ``CONFIG_DIR`` is their folder on disk; Hydra reads them as ``pkg://difflab.configs``."""
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
CONFIG_PATH = "pkg://difflab.configs"
