"""Autoencoders: KL VAE shapes and maths, AutoencoderModule training + checkpoint reload, diffusers wrapper, loading."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from difflab.autoencoders.kl_vae import KLAutoencoder, gaussian_kl
from difflab.autoencoders.loading import autoencoder_identity, build_autoencoder, load_autoencoder, state_dict_sha256
from difflab.lit_modules.autoencoder_module import AutoencoderModule, psnr
from difflab.utils.errors import CheckpointError, ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription (10x faster here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_vae(seed: int = 0, **kw) -> KLAutoencoder:
    torch.manual_seed(seed)
    args = dict(
        in_channels=1,
        latent_channels=4,
        base_channels=8,
        channel_mults=[1, 2],
        num_res_blocks=1,
        norm_groups=4,
        mid_attention=True,
    )
    args.update(kw)
    return KLAutoencoder(**args)


def smooth_images(n: int, c: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Low-frequency random images in [-1, 1] (learnable by a tiny autoencoder in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, c, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


class DictImages(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "label": torch.tensor(i % 3)}


# ---------------------------------------------------------------------------------------------- KL VAE
@pytest.mark.parametrize("mults,factor", [([1, 2], 4), ([1, 2, 2], 8)])
def test_kl_vae_shapes(mults, factor):
    vae = tiny_vae(channel_mults=mults, in_channels=3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = vae.encode(x)
    assert vae.downsample_factor == factor and vae.latent_channels == 4
    assert z.shape == (2, 4, 32 // factor, 32 // factor)
    y = vae.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    out = vae(x)
    assert out["recon"].shape == x.shape and out["mean"].shape == out["logvar"].shape == z.shape


def test_kl_vae_encode_mean_vs_sample():
    vae = tiny_vae()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    mean, logvar = vae.posterior(x)
    assert torch.equal(vae.encode(x), mean)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1, s2 = vae.encode(x, sample=True, generator=g1), vae.encode(x, sample=True, generator=g2)
    assert torch.equal(s1, s2) and not torch.allclose(s1, mean)
    # sample = mean + std * eps with the generator's eps
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(s1, mean + (0.5 * logvar).exp() * eps, atol=1e-6)


def test_kl_vae_rejects_indivisible_size():
    with pytest.raises(ValueError, match="divisible"):
        tiny_vae().encode(torch.zeros(1, 1, 18, 18))


def test_gaussian_kl_matches_torch_distributions():
    mean, logvar = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    ref = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(gaussian_kl(mean, logvar), ref, atol=1e-5)


def test_psnr_closed_form():
    x = torch.zeros(2, 1, 4, 4)
    y = x + 0.2  # error 0.1 after mapping [-1, 1] -> [0, 1]: mse 0.01 -> 20 dB
    assert torch.allclose(psnr(y, x), torch.full((2,), 20.0), atol=1e-4)


# ---------------------------------------------------------------------------------------------- identity
def test_identity_hash_is_deterministic_and_sensitive():
    a, b = tiny_vae(seed=0), tiny_vae(seed=0)
    assert a.identity()["hash"] == b.identity()["hash"] == autoencoder_identity(b)["hash"]
    assert a.identity()["class"] == "difflab.autoencoders.kl_vae.KLAutoencoder"
    assert a.identity()["config"]["channel_mults"] == [1, 2]
    with torch.no_grad():
        b.decoder.conv_out.bias[0] += 1e-3
    assert a.identity()["hash"] != b.identity()["hash"]
    assert state_dict_sha256(a) != state_dict_sha256(a.half())  # dtype is part of the hash
    # same weights, different behaviour-relevant config (GroupNorm groups) -> different hash
    c, d = tiny_vae(seed=0, norm_groups=4), tiny_vae(seed=0, norm_groups=2)
    d.load_state_dict(c.state_dict())
    assert state_dict_sha256(c) == state_dict_sha256(d) and c.identity()["hash"] != d.identity()["hash"]


# ---------------------------------------------------------------------------------------------- training + ckpt
def _trainer(tmp_path, steps):
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )


def test_autoencoder_module_trains_and_checkpoint_reloads(tmp_path):
    x = smooth_images(32)
    module = AutoencoderModule(tiny_vae(mid_attention=False), lr=3e-3, kl_weight=1e-6, recon_loss="l2")
    before = module.losses(x, module.autoencoder(x, sample=False))["recon"].item()
    loader = DataLoader(DictImages(x), batch_size=16, shuffle=True)
    trainer = _trainer(tmp_path, steps=30)
    trainer.fit(module, loader, DataLoader(DictImages(x[:16]), batch_size=16))
    module.eval()
    after = module.losses(x, module.autoencoder(x, sample=False))["recon"].item()
    assert after < 0.7 * before, (before, after)
    assert {"train/loss", "train/recon", "train/kl", "val/psnr"} <= set(trainer.logged_metrics)

    ckpt = tmp_path / "ae.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # must not need pickled objects
    assert raw["difflab"]["kind"] == "autoencoder"
    assert raw["difflab"]["config"]["_target_"] == "difflab.autoencoders.kl_vae.KLAutoencoder"
    assert raw["difflab"]["config"]["mid_attention"] is False
    assert tuple(raw["hyper_parameters"]["betas"]) == (0.5, 0.9)

    loaded, identity = load_autoencoder(str(ckpt))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert identity["hash"] == module.autoencoder.identity()["hash"]
    assert identity["spec"] == {"ckpt_path": str(ckpt.resolve())}
    assert loaded.difflab_identity is identity
    with torch.no_grad():
        z = module.autoencoder.encode(x)
        assert torch.equal(loaded.encode(x), z)
        assert torch.equal(loaded.decode(z), module.autoencoder.decode(z))
    # via a config (what configs/autoencoder/kl_vae.yaml + autoencoder.ckpt_path=... gives)
    again, ident2 = load_autoencoder(
        {"_target_": "difflab.autoencoders.kl_vae.KLAutoencoder", "in_channels": 1, "ckpt_path": str(ckpt)}
    )
    assert ident2["hash"] == identity["hash"]
    # build_autoencoder gives a trainable copy initialised from the checkpoint (fine-tuning)
    trainable = build_autoencoder({"ckpt_path": str(ckpt)})
    assert all(p.requires_grad for p in trainable.parameters())


def test_checkpoint_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match="nope.ckpt") as e:
        load_autoencoder(str(missing))
    assert "\n" not in str(e.value)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt.ckpt") as e:
        load_autoencoder(str(corrupt))
    assert "\n" not in str(e.value)
    other = tmp_path / "diffusion.ckpt"
    torch.save({"state_dict": {}, "difflab": {"kind": "diffusion", "config": {}}}, other)
    with pytest.raises(CheckpointError, match="not a difflab autoencoder checkpoint"):
        load_autoencoder(str(other))


def test_kl_vae_config_needs_ckpt_for_frozen_use():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIGS / "autoencoder" / "kl_vae.yaml")
    with pytest.raises(ConfigError, match="ckpt_path"):
        load_autoencoder(cfg)
    vae = build_autoencoder(cfg)  # fresh model for training: digits-size defaults, 4x
    assert isinstance(vae, KLAutoencoder) and vae.downsample_factor == 4
    assert vae.encode(torch.zeros(2, 1, 16, 16)).shape == (2, 4, 4, 4)
    assert load_autoencoder(OmegaConf.load(CONFIGS / "autoencoder" / "none.yaml")) == (None, None)


def test_module_accepts_config_and_rejects_bad_loss():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIGS / "autoencoder" / "kl_vae.yaml")
    assert isinstance(AutoencoderModule(cfg).autoencoder, KLAutoencoder)
    with pytest.raises(ConfigError, match="recon_loss"):
        AutoencoderModule(tiny_vae(), recon_loss="huber")


# ---------------------------------------------------------------------------------------------- LPIPS
def test_lpips_loads_local_backbone_and_stays_out_of_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(0)
    features = {k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")}
    path = tmp_path / "alexnet-owt-7be5be79.pth"  # torchvision's file format (classifier omitted: unused)
    torch.save(features, path)
    module = AutoencoderModule(tiny_vae(), lpips_weight=0.5, lpips_backbone_weights=str(path))
    assert module._lpips is not None
    net = module._lpips.module.net
    sd = net.state_dict()
    assert torch.equal(sd["slice1.0.weight"], features["features.0.weight"])
    assert torch.equal(sd["slice5.10.weight"], features["features.10.weight"])
    assert not any("lpips" in k or "slice" in k for k in module.state_dict())
    x = smooth_images(2)
    losses = module.losses(x, module.autoencoder(x))
    assert losses["lpips"] > 0
    assert torch.allclose(losses["loss"], losses["recon"] + 1e-6 * losses["kl"] / 256 + 0.5 * losses["lpips"])
    losses["loss"].backward()  # gradients flow through LPIPS into the autoencoder
    assert module.autoencoder.decoder.conv_out.weight.grad is not None


def test_lpips_without_weights_warns_and_disables(tmp_path):
    with pytest.warns(UserWarning, match="LPIPS"):
        module = AutoencoderModule(tiny_vae(), lpips_weight=0.5, lpips_backbone_weights=str(tmp_path / "none.pth"))
    assert module._lpips is None


# ---------------------------------------------------------------------------------------------- diffusers
def _tiny_diffusers_vae(seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.25,
    )


def test_diffusers_kl_local_round_trip(tmp_path):
    from difflab.autoencoders.diffusers_kl import DiffusersKL

    vae = _tiny_diffusers_vae().eval()
    vae.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "config.json").is_file()
    ae = DiffusersKL(str(tmp_path / "vae"))
    assert (ae.latent_channels, ae.downsample_factor, ae.scaling_factor) == (4, 2, 0.25)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (2, 4, 8, 8)
        assert torch.allclose(z, vae.encode(x).latent_dist.mean * 0.25, atol=1e-6)
        assert torch.allclose(ae.decode(z), vae.decode(z / 0.25).sample.clamp(-1, 1), atol=1e-6)

    loaded, ident = load_autoencoder(
        {"_target_": "difflab.autoencoders.diffusers_kl.DiffusersKL", "pretrained": str(tmp_path / "vae")}
    )
    assert ident["hash"] == ae.identity()["hash"] and ident["spec"]["pretrained"] == str(tmp_path / "vae")
    # the same files elsewhere give the same hash (location is not identity); another scaling does not
    shutil.copytree(tmp_path / "vae", tmp_path / "moved")
    assert DiffusersKL(str(tmp_path / "moved")).identity()["hash"] == ident["hash"]
    assert DiffusersKL(str(tmp_path / "vae"), scaling_factor=1.0).identity()["hash"] != ident["hash"]
    # a plain string that is a directory is read as a diffusers spec
    assert load_autoencoder(str(tmp_path / "vae"))[1]["hash"] == ident["hash"]


def test_diffusers_kl_missing_dir_is_checkpoint_error(tmp_path):
    pytest.importorskip("diffusers")
    from difflab.autoencoders.diffusers_kl import DiffusersKL

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="missing_vae"):
            DiffusersKL(str(tmp_path / "missing_vae"), local_files_only=True)
