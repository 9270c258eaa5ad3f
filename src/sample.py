"""Sample from a checkpoint: ``difflab-sample ckpt_path=PATH n=500 out_dir=DIR [sampler=ddim sampler.steps=25]
[guidance.scale=3] [guidance.method=apg] [labels=[0,1]] [prompts='["a photo of a horse"]']``.

``guidance.*`` overrides the checkpoint's guidance (null keys keep it): ``guidance.method`` is cfg, cfgpp
(``guidance.scale`` = lambda in [0, 1]), apg (``guidance.eta``, ``norm_threshold``, ``momentum``), autoguidance
(``guidance.guide_ckpt=<a weaker checkpoint>``) or autoguidance_cfg (autoguidance plus ``guidance.cfg_scale`` in
``guidance.cfg_interval``).

PATH: a training checkpoint (*.ckpt, loaded with weights_only=True; its EMA weights are used) or an export written
by ``difflab-export`` (its directory or its model.safetensors)."""

import hydra
from omegaconf import DictConfig

from difflab.configs import CONFIG_PATH
from difflab.utils.cli import console_command


@console_command
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def main(cfg: DictConfig) -> None:
    from difflab.sampling import run_sampling
    from difflab.trust import trust_from
    from difflab.utils.cli import run_reporting_errors

    with trust_from(cfg):
        run_reporting_errors(run_sampling, cfg, extra=(ValueError,))


if __name__ == "__main__":
    main()
