"""The documented notebook path: a Diffusion object and a denoiser, from a checkpoint or a config, train and sample
with no Trainer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from difflab.checkpoints import module_from_checkpoint

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampling_from_a_checkpoint_without_a_trainer(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "step_0000004.ckpt"
    out = tmp_path / "grid.png"
    images = _example("sample_without_trainer").main(str(ckpt), str(out), n=20)
    assert out.is_file() and images.shape == (20, 1, 8, 8) and images.abs().max() <= 1
    lit = module_from_checkpoint(ckpt)  # the same weights through the LightningModule: the same images
    again = lit.diffusion.sample(lit, 20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, again, rtol=0, atol=0)


def test_a_diffusion_object_from_a_config_trains_and_samples_a_denoiser(tmp_path):
    from hydra.utils import instantiate

    from tests.helpers import compose_train

    cfg = compose_train(
        tmp_path,
        [
            "datamodule.image_size=8",
            "model.diffusion.sample_shape=[1,8,8]",
            "conditioning.num_classes=10",
            "model.net.base_channels=8",
            "model.net.channel_mults=[1,2]",
            "model.net.attention_levels=[]",
            "model.net.groups=4",
            "sampler.steps=2",
        ],
    )
    diffusion = instantiate(cfg.model.diffusion)
    c = diffusion.conditioner
    denoiser = instantiate(cfg.model.net)(cond_dim=c.vector_dim, context_dim=c.context_dim)
    batch = {"x": torch.rand(6, 1, 8, 8) * 2 - 1, "label": torch.arange(6) % 10}
    opt = torch.optim.AdamW([*denoiser.parameters(), *c.parameters()], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = diffusion.loss(denoiser, batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the same noise every step: the loss on it must fall
    x = diffusion.sample(denoiser, 4, torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
