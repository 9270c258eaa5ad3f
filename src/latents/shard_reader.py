"""Reading a sharded latent dataset (written by ``difflab.latents.shards``): its manifest checked, split locations
and the shard layout a saved reading position depends on; the data itself is read by
``difflab.datamodules.streaming_latents``."""

from __future__ import annotations

from pathlib import Path

from difflab.latents.format import FORMAT, VERSION
from difflab.latents.latent_set import LatentSet
from difflab.storage.litdata_shards import LAYOUT, check_shards_complete, check_split_index, shard_info
from difflab.storage.location import fetch_json, is_url, join
from difflab.storage.manifest import MANIFEST, check_manifest_data
from difflab.utils.errors import ConfigError, CorruptDataError, DataNotFoundError

SHARD_FORMAT = "difflab-latent-shards"
SHARD_VERSION = 1


def check_shard_manifest(manifest: dict | None, location: str) -> dict:
    """The manifest of a finished shard directory, or a one-line error saying why it cannot be read."""
    rewrite = "rewrite it with encode_latents.py format=shards overwrite=true"
    if manifest is None:
        raise DataNotFoundError(
            f"no sharded latent dataset at {location} ({MANIFEST} missing): write one with "
            f"python encode_latents.py autoencoder=... datamodule=... format=shards "
            f"out_dir={location}"
        )
    if isinstance(manifest, dict) and manifest.get("format") == "difflab-clip-shards":  # prepare_clips.py
        raise ConfigError(f"{location} holds video clips, not latents: read it with datamodule=clips_stream")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptDataError(
            f"{join(location, MANIFEST)} is not a difflab latent cache manifest (format != {FORMAT!r})"
        )
    if manifest.get("version") != VERSION:
        raise CorruptDataError(
            f"{location} is a latent cache of format version {manifest.get('version')}, this "
            f"difflab reads version {VERSION}: {rewrite}"
        )
    if manifest.get("layout") != LAYOUT:
        raise ConfigError(
            f"{location} is a memory-mapped latent cache, not shards: use datamodule=latents, or "
            f"write shards with encode_latents.py format=shards"
        )
    check_shards_complete(
        manifest,
        location,
        SHARD_FORMAT,
        SHARD_VERSION,
        rewrite,
        what="sharded latent dataset",
        rerun=f"encode_latents.py with format=shards out_dir={location}",
    )
    return check_manifest_data(manifest, join(location, MANIFEST))


class LatentShards(LatentSet):
    """A finished shard directory opened for reading: the manifest, normalisation tensors, split locations.

    Shares ``LatentSet``'s manifest accessors, autoencoder hash check and decoding.
    """

    def __init__(self, location: str | Path, storage_options: dict | None = None, check_index: bool = True):
        location = str(location) if is_url(location) else str(Path(location).expanduser())
        self.location, self.storage_options = location, storage_options
        self.dir = location  # for LatentSet's messages
        manifest = check_shard_manifest(fetch_json(location, MANIFEST, storage_options), location)
        self.use_manifest(manifest)
        if check_index:
            for split in self.splits:
                check_split_index(manifest, location, split, storage_options)

    def split_location(self, split: str) -> str:
        self.split_info(split)
        return join(self.location, split)

    @property
    def samples_per_shard(self) -> int:
        return int(shard_info(self.manifest)["samples_per_shard"])

    def layout_identity(self, split: str) -> dict:
        """What a saved reading position depends on: the split's size and shard layout."""
        info = shard_info(self.manifest)
        return {
            "split": split,
            "count": self.count(split),
            "samples_per_shard": info["samples_per_shard"],
            "order_seed": info.get("order_seed"),
        }


def open_shards(location: str | Path, storage_options: dict | None = None) -> LatentShards:
    """Open a finished shard directory (local path or object-storage URL), checking manifest and shard indexes."""
    return LatentShards(location, storage_options)
