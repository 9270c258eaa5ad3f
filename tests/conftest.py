"""Fixtures shared by several test modules."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def squeeze_backbone(tmp_path_factory):
    """A randomly initialised torchvision squeezenet1_1 state dict: the on-disk format of the real LPIPS backbone."""
    from torchvision.models import squeezenet1_1

    path = tmp_path_factory.mktemp("lpips") / "squeezenet1_1-b8a52dc0.pth"
    torch.manual_seed(0)
    torch.save(squeezenet1_1(weights=None).state_dict(), path)
    return path
