"""Encode a dataset into a latent cache: `difflab-encode-latents autoencoder=kl_vae autoencoder.ckpt_path=...
datamodule=digits out_dir=...` (rerun the same command to resume; see configs/encode_latents.yaml). `format=shards`
writes litdata shards instead of one memory-mapped file (difflab.latents.shards; read with datamodule=latents_stream).
"""

import hydra
from omegaconf import DictConfig

from difflab.configs import CONFIG_PATH
from difflab.utils.cli import console_command


def run(cfg: DictConfig) -> dict:
    """Load the frozen autoencoder and the datamodule from ``cfg`` and write/finish the cache; returns the manifest."""
    import torch

    from difflab.autoencoders.loading import load_autoencoder
    from difflab.latents.encode import describe_datamodule, encode_dataset
    from difflab.utils.errors import DifflabError

    autoencoder, identity = load_autoencoder(cfg.autoencoder)
    if autoencoder is None:
        raise DifflabError(
            "autoencoder=none: choose an autoencoder to encode with (autoencoder=kl_vae "
            "autoencoder.ckpt_path=... or autoencoder=diffusers_kl)"
        )
    device = cfg.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    fmt = cfg.get("format", "mmap")
    write = encode_dataset
    extra = {}
    if fmt == "shards":
        from difflab.latents.shards import encode_dataset_shards
        from difflab.storage.location import require_litdata

        require_litdata("encode_latents.py format=shards")  # before the datamodule is built
        write = encode_dataset_shards
        extra = {"samples_per_shard": cfg.get("shard_samples"), "order_seed": cfg.get("shard_seed", 0)}
    elif fmt != "mmap":
        raise DifflabError(f"format={fmt}: choose mmap (one memory-mapped cache) or shards (litdata shards)")
    datamodule = hydra.utils.instantiate(cfg.datamodule)
    manifest = write(
        autoencoder,
        datamodule,
        cfg.out_dir,
        identity=identity,
        dataset=describe_datamodule(cfg.datamodule),
        splits=list(cfg.splits),
        batch_size=cfg.batch_size,
        dtype=cfg.dtype,
        target_std=cfg.target_std,
        per_channel=cfg.per_channel,
        overwrite=cfg.overwrite,
        num_workers=cfg.num_workers,
        device=device,
        progress=cfg.progress,
        **extra,
    )
    counts = ", ".join(f"{s}={v['count']}" for s, v in manifest["splits"].items())
    kind = "latent cache" if fmt == "mmap" else f"sharded latents ({manifest['shards']['samples_per_shard']} per shard)"
    print(
        f"{kind} {cfg.out_dir}: {manifest['status']} ({counts}; latents {manifest['latent_shape']} "
        f"{manifest['latent_dtype']}; std {['%.3g' % s for s in manifest['transform']['std']]})"
    )
    return manifest


@console_command
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="encode_latents")
def main(cfg: DictConfig) -> None:
    from difflab.trust import trust_from
    from difflab.utils.cli import run_reporting_errors

    with trust_from(cfg):
        run_reporting_errors(run, cfg)


if __name__ == "__main__":
    main()
