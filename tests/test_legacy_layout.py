"""Checkpoints of the flat DiffusionModule layout (before the Diffusion object, the guidance objects and the
optimizer / LR-schedule groups) load through the one migration function and sample the same images."""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.checkpoints import load_weights, migrate_config, module_from_checkpoint
from tests.fixtures.make_flat_module_fixture import reference_samples

FLAT = Path(__file__).parent / "fixtures" / "flat_module"  # written at a825d78 by make_flat_module_fixture.py


def test_the_flat_layout_migrates_to_diffusion_optimizer_and_schedule():
    raw = torch.load(FLAT / "last.ckpt", map_location="cpu", weights_only=True)["difflab"]["config"]["model"]
    assert "guidance" in raw and "diffusion" not in raw  # the fixture really is the old layout
    model = load_weights(FLAT / "last.ckpt")["config"]["model"]
    assert set(model) == {
        "_target_",
        "net",
        "diffusion",
        "optimizer",
        "lr_schedule",
        "lr",
        "loss_buckets",
        "compile",
        "channels_last",
    }
    assert model["diffusion"]["guidance"] == {
        "_target_": "difflab.diffusion.guidance.APG",
        "scale": 3,
        "interval": None,
        "per_class": {1: 5.0},
        "eta": 0.0,
        "norm_threshold": 0.0,
        "momentum": -0.5,
    }
    assert model["optimizer"] == {
        "_target_": "torch.optim.AdamW",
        "_partial_": True,
        "betas": raw["betas"],
        "weight_decay": raw["weight_decay"],
    }  # eps was never a config key there
    assert model["lr_schedule"] == {
        "_target_": "difflab.optim.lr_schedules.WarmupCosine",
        "warmup": raw["warmup_steps"],
        "start_factor": raw["warmup_start_factor"],
        "final_fraction": raw["final_lr_fraction"],
    }
    assert model["lr"] == raw["lr"] and model["diffusion"]["sample_shape"] == raw["sample_shape"]


def test_migration_is_idempotent_and_leaves_todays_layout_alone():
    config = load_weights(FLAT / "last.ckpt")["config"]
    before = repr(config)
    assert repr(migrate_config(config)) == before


def test_a_flat_checkpoint_samples_the_images_it_drew_when_written():
    """Equal up to float32 round-off (the thread count changes the order of sums; guidance scales of 3 and 5
    amplify it); dropping any migrated guidance setting moves the samples by far more."""
    module = module_from_checkpoint(FLAT / "last.ckpt")
    assert type(module.diffusion.guidance).__name__ == "APG" and module.diffusion.guidance.momentum == -0.5
    written = torch.load(FLAT / "samples.pt")
    torch.testing.assert_close(reference_samples(module), written, rtol=0, atol=5e-5)
    for lost in ({"momentum": 0.0}, {"per_class": {}}, {"method": "cfg"}):
        module.diffusion.guidance = (
            module.diffusion.guidance.updated(lost)
            if "method" not in lost
            else module.diffusion.guidance_for({"method": "cfg"})
        )
        assert (reference_samples(module) - written).abs().max() > 1e-3, lost
        module = module_from_checkpoint(FLAT / "last.ckpt")
