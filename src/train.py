"""Train a diffusion model: ``difflab-train experiment=<name> [group=option] [key=value ...]``
(also ``python -m difflab.train`` or ``python train.py`` in a checkout).

Sweeps: ``-m model.lr=1e-4,2e-4 [trainer=ddp]`` (each job once, in its own directory, DDP included).
Resume: ``ckpt_path=last hydra.run.dir=<run dir>`` or ``resume=auto hydra.run.dir=<run dir>``; fine-tune:
``init_from=PATH``. Heavy modules (torch, Lightning) are imported inside ``main`` so ``--help`` and ``--cfg`` are fast.
"""

import sys

import hydra
from omegaconf import DictConfig

from difflab.configs import CONFIG_PATH
from difflab.utils.cli import console_command


@console_command
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from difflab.ops import ddp_multirun
    from difflab.pipeline import optimized_value, train
    from difflab.trust import trust_from
    from difflab.utils.cli import run_reporting_errors

    ddp_multirun.install()  # DDP children run the current sweep job only (Lightning#11300)
    with trust_from(cfg):
        objs = run_reporting_errors(train, cfg)
    if objs.get("stopped_by_signal"):
        sys.exit(0)  # stopped by SIGTERM/SIGINT after saving a checkpoint: end the process (and any sweep) cleanly
    return optimized_value(cfg, objs["metrics"])  # optimized_metric, for Hydra's sweepers (hparams_search=...)


if __name__ == "__main__":
    main()
