"""Write a video datamodule's clips as litdata shards: `difflab-prepare-clips datamodule=moving_digits
out_dir=data/clips/moving_digits` (how2sign, phoenix and sign_video too; rerun the same command to resume; see
configs/prepare_clips.yaml). Train on them with datamodule=clips_stream datamodule.cache_dir=<out_dir or its URL>
(difflab.datamodules.streaming_clips).
"""

import hydra
from omegaconf import DictConfig

from difflab.configs import CONFIG_PATH
from difflab.utils.cli import console_command


def run(cfg: DictConfig) -> dict:
    """Build the datamodule from ``cfg`` and write/finish its clip shards; returns the manifest."""
    from difflab.datamodules.streaming_clips import prepare_clip_shards
    from difflab.latents.encode import describe_datamodule
    from difflab.storage.location import require_litdata

    require_litdata("prepare_clips.py")  # before the datamodule is built (it may download or generate data)
    datamodule = hydra.utils.instantiate(cfg.datamodule)
    manifest = prepare_clip_shards(
        datamodule,
        cfg.out_dir,
        dataset=describe_datamodule(cfg.datamodule),
        splits=list(cfg.splits),
        samples_per_shard=cfg.shard_samples,
        order_seed=cfg.shard_seed,
        overwrite=cfg.overwrite,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        progress=cfg.progress,
    )
    counts = ", ".join(f"{s}={v['count']}" for s, v in manifest["splits"].items())
    print(
        f"clip shards {cfg.out_dir}: {manifest['status']} ({counts}; clips {manifest['sample_shape']} C x T x H x W "
        f"uint8, {manifest['shards']['samples_per_shard']} per shard)"
    )
    return manifest


@console_command
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="prepare_clips")
def main(cfg: DictConfig) -> None:
    from difflab.utils.cli import run_reporting_errors

    run_reporting_errors(run, cfg)


if __name__ == "__main__":
    main()
