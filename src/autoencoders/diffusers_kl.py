"""Pretrained diffusers ``AutoencoderKL`` (e.g. Stable Diffusion's VAE) behind the difflab autoencoder contract.

diffusers is an optional extra (``pip install 'difflab[latent]'``) and is imported only when this class is built.
Latents follow the diffusers convention: ``z = (mean - shift_factor) * scaling_factor`` on encode and the inverse
before decoding, so a latent cache or a diffusion model sees the same numbers a diffusers pipeline would.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from difflab.autoencoders.loading import autoencoder_identity
from difflab.utils.errors import CheckpointError
from difflab.utils.extras import require


class DiffusersKL(nn.Module):
    """``diffusers.AutoencoderKL.from_pretrained(pretrained, subfolder=...)`` with ``encode``/``decode``/``identity``.

    ``pretrained`` is a Hub id (needs network access the first time) or a local directory holding
    ``config.json`` + ``diffusion_pytorch_model.safetensors`` as written by ``save_pretrained``.
    ``scaling_factor=None`` uses the model config's ``scaling_factor`` (and ``shift_factor``); pass 1.0 for raw
    posterior means.
    """

    hash_exclude = ("pretrained", "subfolder", "local_files_only")  # locations, not behaviour

    def __init__(
        self,
        pretrained: str = "stabilityai/sd-vae-ft-mse",
        subfolder: str | None = None,
        scaling_factor: float | None = None,
        local_files_only: bool = False,
    ):
        super().__init__()
        AutoencoderKL = require("diffusers", "autoencoder=diffusers_kl").AutoencoderKL
        where = f"{pretrained}" + (f" (subfolder {subfolder})" if subfolder else "")
        try:
            self.vae = AutoencoderKL.from_pretrained(
                str(pretrained), subfolder=subfolder, local_files_only=local_files_only
            )
        except (OSError, ValueError, EnvironmentError) as e:
            hint = (
                ""
                if Path(str(pretrained)).exists()
                else " (a Hub id needs network access once; or give a local directory written by save_pretrained)"
            )
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot load diffusers AutoencoderKL from {where}: {msg}{hint}") from e
        cfg = self.vae.config
        self.scaling_factor = float(cfg.scaling_factor if scaling_factor is None else scaling_factor)
        shift = getattr(cfg, "shift_factor", None) if scaling_factor is None else None
        self.shift_factor = float(shift or 0.0)
        self.in_channels = int(cfg.in_channels)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.config = dict(
            pretrained=str(pretrained),
            subfolder=subfolder,
            scaling_factor=scaling_factor,
            local_files_only=bool(local_files_only),
        )
        self.vae.eval()

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents for pixels in [-1, 1]: posterior mean, or a sample with ``sample=True``."""
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return ((z - self.shift_factor) * self.scaling_factor).to(x.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (clamped) for scaled latents."""
        raw = z.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(raw).sample.clamp(-1, 1).to(z.dtype)

    def forward(self, x: torch.Tensor, sample: bool = True) -> dict:
        """Reconstruction and posterior statistics, like ``KLAutoencoder.forward`` (for fine-tuning)."""
        dist = self.vae.encode(x).latent_dist
        z = dist.sample() if sample else dist.mean
        return {"recon": self.vae.decode(z).sample, "mean": dist.mean, "logvar": dist.logvar, "z": z}

    @property
    def hash_extra(self) -> dict:
        """What changes outputs besides the weights: the effective scaling and the loaded model config."""
        vae_cfg = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor, "vae_config": vae_cfg}

    def identity(self) -> dict:
        """{class, config, hash}; the hash covers the weights and the scaling, not where they were loaded from."""
        ident = autoencoder_identity(self)
        ident["scaling_factor"], ident["shift_factor"] = self.scaling_factor, self.shift_factor
        return ident
