"""Lightning module that trains an autoencoder (the latent-diffusion first stage).

Loss (per element, i.e. the latent-diffusion VAE loss divided by the pixel count, so ``kl_weight`` keeps its usual
meaning, typically 1e-6):  recon + lpips_weight * LPIPS + kl_weight * KL_per_sample / (C*H*W).
Checkpoints store ``checkpoint["difflab"] = {"kind": "autoencoder", "config": {_target_, ctor args}}`` so
``difflab.autoencoders.loading.load_autoencoder(path)`` rebuilds the model from the file alone (weights_only load), and
``run_config`` (the run's resolved config), so that a resume meets the same rule as a diffusion run's.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import lightning as L
import torch
from torch import nn

from difflab.autoencoders.kl_vae import gaussian_kl
from difflab.autoencoders.loading import CHECKPOINT_KIND, build_autoencoder, class_path, to_plain
from difflab.metrics.lpips_metric import build_lpips, prepare_lpips_frames
from difflab.ops.resume import refuse_changed_settings, stored_config
from difflab.utils.errors import ConfigError
from difflab.utils.frozen import Frozen


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak range 2, i.e. [0, 1] after rescaling)."""
    mse = ((x - y) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


class AutoencoderModule(L.LightningModule):
    """Train a KL autoencoder on dict batches ``{"x": B x C x H x W in [-1, 1], ...}``."""

    def __init__(
        self,
        autoencoder: Any,
        lr: float = 1e-4,
        betas: Sequence[float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        kl_weight: float = 1e-6,
        recon_loss: str = "l1",
        lpips_weight: float = 0.0,
        lpips_net: str = "alex",
        lpips_backbone_weights: str | None = None,
    ):
        super().__init__()
        if recon_loss not in ("l1", "l2"):
            raise ConfigError(f"recon_loss must be 'l1' or 'l2'; got {recon_loss!r}")
        self.autoencoder = autoencoder if isinstance(autoencoder, nn.Module) else build_autoencoder(autoencoder)
        if not hasattr(self.autoencoder, "config"):
            raise ConfigError(
                f"{class_path(self.autoencoder)} has no .config dict of constructor args; checkpoints "
                f"could not rebuild it"
            )
        betas = tuple(float(b) for b in betas)  # plain values: checkpoints must load with weights_only=True
        lpips_backbone_weights = str(lpips_backbone_weights) if lpips_backbone_weights else None
        self.save_hyperparameters(ignore=["autoencoder"])
        self.run_config: dict | None = None  # the resolved Hydra config (set by the pipeline), stored in checkpoints
        # LPIPS backbone only from a local torchvision file (default: torch hub cache); missing -> one warning, off
        lp = build_lpips(lpips_net, lpips_backbone_weights) if lpips_weight > 0 else None
        self._lpips = Frozen(lp) if lp is not None else None  # not a submodule: not saved, not optimised

    # ---------------------------------------------------------------- losses
    def lpips_distance(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS between batches in [-1, 1]; frames prepared by ``prepare_lpips_frames`` (grey -> RGB, small
        images upsampled to the shared minimum side)."""
        self._lpips.to(x.device)
        x, recon = prepare_lpips_frames(x), prepare_lpips_frames(recon)
        return self._lpips.module(recon, x).mean()  # gradients flow to recon; LPIPS weights are frozen

    def losses(self, x: torch.Tensor, out: dict) -> dict:
        """{loss, recon, kl, lpips}: see the module docstring for the weighting."""
        recon = out["recon"]
        rec = (recon - x).abs().mean() if self.hparams.recon_loss == "l1" else (recon - x).pow(2).mean()
        kl = gaussian_kl(out["mean"], out["logvar"]).mean()
        loss = rec + self.hparams.kl_weight * kl / x[0].numel()
        lp = torch.zeros((), device=x.device)
        if self._lpips is not None and self.hparams.lpips_weight > 0:
            lp = self.lpips_distance(x, recon)
            loss = loss + self.hparams.lpips_weight * lp
        return {"loss": loss, "recon": rec, "kl": kl, "lpips": lp}

    # ---------------------------------------------------------------- steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["x"]
        losses = self.losses(x, self.autoencoder(x, sample=True))
        for k in ("loss", "recon", "kl") + (("lpips",) if self._lpips is not None else ()):
            self.log(f"train/{k}", losses[k], prog_bar=k == "loss", batch_size=len(x))
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["x"]
        out = self.autoencoder(x, sample=False)
        losses = self.losses(x, out)
        self.log("val/loss", losses["loss"], sync_dist=True, batch_size=len(x))
        self.log("val/recon", losses["recon"], sync_dist=True, batch_size=len(x))
        self.log(
            "val/psnr", psnr(out["recon"].clamp(-1, 1), x).mean(), sync_dist=True, prog_bar=True, batch_size=len(x)
        )

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.Adam(self.autoencoder.parameters(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)

    # ---------------------------------------------------------------- checkpoints
    def autoencoder_config(self) -> dict:
        """Plain {_target_, constructor args} of the trained autoencoder."""
        return {"_target_": class_path(self.autoencoder), **copy.deepcopy(to_plain(self.autoencoder.config))}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["difflab"] = {"kind": CHECKPOINT_KIND, "config": self.autoencoder_config()}
        if self.run_config is not None:  # what a resume compares (difflab.ops.resume.refuse_changed_settings)
            checkpoint["difflab"]["run_config"] = copy.deepcopy(self.run_config)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # the last guard for a fit outside pipeline.train (the pre-flight and train check first)
        refuse_changed_settings("ckpt_path", stored_config(checkpoint), self.run_config)
