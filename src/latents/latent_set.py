"""What a finished latent dataset offers whatever its layout (memory maps or shards): manifest accessors, the
normalisation tensors, the autoencoder check and decoding."""

from __future__ import annotations

import json
import weakref
from typing import Any

import torch

from difflab.autoencoders.loading import known_identity
from difflab.latents.normalisation import denormalise
from difflab.utils.errors import ConfigError


class LatentSet:
    """A finished latent dataset opened for reading; subclasses set ``dir`` and call ``use_manifest``."""

    dir: Any
    manifest: dict

    def use_manifest(self, manifest: dict) -> None:
        """Keep the checked manifest and its normalisation tensors."""
        self.manifest = manifest
        t = manifest["transform"]
        self.scale = torch.tensor(t["scale"], dtype=torch.float32)
        self.shift = torch.tensor(t["shift"], dtype=torch.float32)
        self._verified: weakref.WeakSet = weakref.WeakSet()  # autoencoders already checked (hashing is not free)

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["latent_shape"])

    @property
    def autoencoder_hash(self) -> str:
        return self.manifest["autoencoder"]["hash"]

    def count(self, split: str) -> int:
        return int(self.split_info(split)["count"])

    def split_info(self, split: str) -> dict:
        info = self.manifest["splits"].get(split)
        if info is None:
            raise ConfigError(f"latent cache {self.dir} has no split {split!r} (has {self.splits})")
        return info

    def check_autoencoder(self, autoencoder: Any) -> None:
        """ConfigError unless ``autoencoder`` is the one this cache was encoded with (same identity hash)."""
        module = getattr(autoencoder, "module", autoencoder)
        if module in self._verified:
            return
        got = known_identity(module)["hash"]
        want = self.autoencoder_hash
        if got == want:
            self._verified.add(module)
        else:
            spec = self.manifest["autoencoder"].get("spec")
            raise ConfigError(
                f"autoencoder hash {got[:12]} differs from the one latent cache {self.dir} was encoded "
                f"with ({want[:12]}, spec {json.dumps(spec)}): decode with that autoencoder or "
                f"re-encode the cache with this one"
            )

    def decode_latents(self, autoencoder: Any, z_normalised: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation and decode to pixels in [-1, 1] (checks the autoencoder hash first)."""
        self.check_autoencoder(autoencoder)
        module = getattr(autoencoder, "module", autoencoder)
        with torch.no_grad():
            return module.decode(denormalise(z_normalised, self.scale, self.shift))
