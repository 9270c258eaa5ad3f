"""Hold frozen, re-loadable modules (text encoders, autoencoders) outside the module tree.

A module held in ``Frozen`` is not a registered submodule of its owner, so it is absent from ``state_dict``
(checkpoints), from ``parameters()`` (the optimizer) and from the EMA copy: ``copy.deepcopy`` of the owner shares
the same holder instead of duplicating the weights.
"""

from __future__ import annotations

import torch
from torch import nn


class Frozen:
    """A non-registered, shared, eval-mode, gradient-free reference to a module."""

    def __init__(self, module: nn.Module):
        module.eval()
        module.requires_grad_(False)
        self.module = module

    def __deepcopy__(self, memo):  # shared between a model and its EMA copy
        return self

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def to(self, *args, **kwargs) -> "Frozen":
        """Move the held module (e.g. to the owner's device); returns self."""
        self.module.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")
