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


def _rounds(name: str):
    """The ``difflab.methods.rounds`` function ``name``, imported only when a config resolves it."""

    def call(*args):
        from difflab.methods import rounds

        return getattr(rounds, name)(*args)

    return call


# ${round_gcd:${method.steps_per_round}} is the step count that ends every progressive round (one length, or the
# listed lengths' greatest common divisor): the cadence that keeps each round's student.
# ${round_total:${method.steps_per_round},${method.teacher_steps},${method.student_steps}} is all rounds' steps: the
# max_steps that ends training with the last round.
for _name in ("round_gcd", "round_total"):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _rounds(_name))
