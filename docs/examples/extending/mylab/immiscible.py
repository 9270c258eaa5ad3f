"""Immiscible diffusion (Li et al. 2024, arXiv 2406.12303): each batch's noise is assigned to its images by a linear
assignment that minimises the summed L2 distance, so no image is noised towards a far-off draw."""

from __future__ import annotations

from typing import Any

import torch
from scipy.optimize import linear_sum_assignment

from difflab.diffusion.objectives import offset_noise_like
from difflab.methods.base import TrainingMethod


def assign_noise(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``noise`` reordered along the batch so that the pairs (x[i], noise[i]) have the least total L2 distance."""
    cost = torch.cdist(x.flatten(1).float(), noise.flatten(1).float())
    _, columns = linear_sum_assignment(cost.cpu().numpy())
    return noise[torch.as_tensor(columns, device=noise.device)]


class ImmiscibleTraining(TrainingMethod):
    """The default denoising loss on batches whose fresh noise (the objective's, offset noise included) is assigned to
    the images: the method's only change. Under DDP each rank assigns within its own batch, as the authors' code does."""

    name = "immiscible"

    def loss(self, module: Any, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["x"]
        noise = assign_noise(x, offset_noise_like(x, module.diffusion.objective.offset_noise))
        return module.diffusion.losses(module, batch, noise=noise)["loss"].mean()
