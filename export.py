"""Export EMA weights for sampling and sharing: `python export.py ckpt_path=PATH out_dir=DIR [weights=ema|raw]`.

Writes DIR/model.safetensors + DIR/config.yaml + DIR/config.json; `python sample.py ckpt_path=DIR` samples from it."""
import sys

import hydra
from omegaconf import DictConfig

from src.ops.export import export_checkpoint
from src.utils.errors import DifflabError


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        paths = export_checkpoint(cfg.ckpt_path, cfg.out_dir, weights=cfg.weights)
    except (DifflabError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"exported to {paths['weights'].parent}")


if __name__ == "__main__":
    main()
