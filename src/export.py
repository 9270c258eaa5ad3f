"""Export EMA weights for sampling and sharing: ``difflab-export ckpt_path=PATH out_dir=DIR [weights=ema|raw]``.

Writes DIR/model.safetensors + DIR/config.yaml + DIR/config.json; ``difflab-sample ckpt_path=DIR`` samples from it.
A sharded checkpoint of ``trainer=fsdp`` (``last.ckpt`` beside its ``last.ckpt.shards-*`` directory) is consolidated on
this process (CPU, no GPUs or process group needed) and exported as the same single file."""

import hydra
from omegaconf import DictConfig

from difflab.configs import CONFIG_PATH
from difflab.utils.cli import console_command


@console_command
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    from difflab.ops.export import export_checkpoint
    from difflab.trust import trust_from
    from difflab.utils.cli import run_reporting_errors

    with trust_from(cfg):
        paths = run_reporting_errors(export_checkpoint, cfg.ckpt_path, cfg.out_dir, cfg.weights, extra=(ValueError,))
    print(f"exported to {paths['weights'].parent}")


if __name__ == "__main__":
    main()
