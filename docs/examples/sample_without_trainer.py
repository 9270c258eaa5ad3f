"""Sample from a difflab checkpoint in a notebook or script: no Trainer, no Hydra run directory.

    python docs/examples/sample_without_trainer.py logs/train/runs/<run>/checkpoints/last.ckpt samples.png

The ``Diffusion`` object holds the process, objective, sampler, guidance and conditioning the run was trained
with; any denoiser (here the checkpoint's EMA weights) is passed to it. tests/test_examples.py runs this file.
"""

from __future__ import annotations

import sys

import torch

from difflab.diffusion.system import load_for_sampling
from difflab.utils.images import make_grid, save_png, to_uint8


def main(ckpt: str, out: str, n: int = 20) -> torch.Tensor:
    diffusion, denoiser = load_for_sampling(ckpt)  # the checkpoint's config passes the trust gate
    generator = torch.Generator().manual_seed(0)
    images = diffusion.sample(denoiser, n, generator=generator)  # the trained sampler and guidance
    sharper = diffusion.sample(
        denoiser, n, generator=torch.Generator().manual_seed(0), guidance={"scale": 3.0}
    )  # any guidance setting, per call
    save_png(make_grid(to_uint8(torch.cat([images, sharper])), nrow=10), out)
    return images


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
