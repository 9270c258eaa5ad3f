"""Latent-space data: encode a dataset once with a frozen autoencoder into a memory-mapped cache (or litdata shards,
``difflab.latents.shards``), read it back."""

from difflab.latents.cache import LatentCache, NormalisedAutoencoder, denormalise, normalise
from difflab.latents.encode import describe_datamodule, encode_dataset
from difflab.latents.shard_reader import LatentShards, open_shards
from difflab.latents.shards import cache_to_shards, encode_dataset_shards

__all__ = [
    "LatentCache",
    "NormalisedAutoencoder",
    "denormalise",
    "normalise",
    "describe_datamodule",
    "encode_dataset",
    "LatentShards",
    "cache_to_shards",
    "encode_dataset_shards",
    "open_shards",
]
