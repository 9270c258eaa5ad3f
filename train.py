"""Train a diffusion model: `python train.py experiment=<name> [group=option] [key=value ...]`.

Sweeps: `python train.py -m model.lr=1e-4,2e-4 [trainer=ddp]` (each job once, in its own directory, DDP included).
Resume: `ckpt_path=last hydra.run.dir=<run dir>` or `resume=auto hydra.run.dir=<run dir>`; fine-tune: `init_from=PATH`.
"""
import logging
import sys

import hydra
from omegaconf import DictConfig

from src.ops import ddp_multirun
from src.pipeline import train
from src.utils.errors import DifflabError

log = logging.getLogger(__name__)
ddp_multirun.install()  # DDP children run the current sweep job only (Lightning#11300)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        objs = train(cfg)
    except DifflabError as err:  # user-facing problems: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if objs.get("stopped_by_signal"):
        sys.exit(0)  # stopped by SIGTERM/SIGINT after saving a checkpoint: end the process (and any sweep) cleanly
    return objs["metrics"].get("val/loss")


if __name__ == "__main__":
    main()
