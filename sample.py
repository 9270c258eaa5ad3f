"""Sample from a checkpoint: `python sample.py ckpt_path=PATH n=500 out_dir=DIR [sampler=ddim sampler.steps=25]
[guidance.scale=3] [labels=[0,1]] [prompts='["a photo of a horse"]']`.

PATH: a training checkpoint (*.ckpt, loaded with weights_only=True; its EMA weights are used) or an export written
by export.py (its directory or its model.safetensors)."""
import sys

import hydra
from omegaconf import DictConfig

from src.sampling import run_sampling
from src.utils.errors import DifflabError


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        run_sampling(cfg)
    except (DifflabError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
