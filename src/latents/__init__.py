"""Latent-space data: encode a dataset once with a frozen autoencoder into a memory-mapped cache, read it back."""
from difflab.latents.cache import LatentCache, NormalisedAutoencoder, denormalise, normalise
from difflab.latents.encode import describe_datamodule, encode_dataset

__all__ = ["LatentCache", "NormalisedAutoencoder", "denormalise", "normalise", "describe_datamodule",
           "encode_dataset"]
