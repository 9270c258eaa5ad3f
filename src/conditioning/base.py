"""The conditioner interface and the two simplest conditioners (none, class labels)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def cond_dict(vector=None, context=None, context_mask=None) -> dict:
    """The conditioning a denoiser consumes: a vector for the time embedding and/or cross-attention tokens."""
    return {"vector": vector, "context": context, "context_mask": context_mask}


class Conditioner(nn.Module):
    """Turns raw conditions from a batch (labels, prompts, ...) into what the denoiser consumes.

    Subclasses set ``batch_key``, ``vector_dim`` and ``context_dim`` and implement ``null_like`` and ``forward``.
    """

    batch_key: str | None = None
    vector_dim: int = 0
    context_dim: int | None = None

    def null_like(self, raw: Any) -> Any:
        """The null (unconditional) condition for a batch of the same size as ``raw``."""
        raise NotImplementedError

    def drop(self, raw: Any, p: float, generator: torch.Generator | None = None) -> Any:
        """Replace a random fraction ``p`` of conditions by the null condition (classifier-free guidance training)."""
        if raw is None or p <= 0:
            return raw
        return self.where_null(raw, self.drop_mask(len(raw), p, generator))

    @staticmethod
    def drop_mask(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Which of n conditions ``drop`` replaces (bool, CPU): each with probability ``p``; no draw when p <= 0."""
        if p <= 0:
            return torch.zeros(n, dtype=torch.bool)
        return torch.rand(n, generator=generator) < p

    def where_null(self, raw: Any, mask: torch.Tensor) -> Any:
        """Conditions with entries where ``mask`` is True replaced by the null condition."""
        null = self.null_like(raw)
        if isinstance(raw, torch.Tensor):
            return torch.where(mask.to(raw.device), null, raw)
        return [n if m else r for r, n, m in zip(raw, null, mask.tolist())]

    def describe(self) -> str:
        """One line for the start-up log."""
        return f"{type(self).__name__}(batch_key={self.batch_key}, vector_dim={self.vector_dim}, context_dim={self.context_dim})"


class NoConditioner(Conditioner):
    """Unconditional models: no vector, no context."""

    def null_like(self, raw):
        return raw

    def drop(self, raw, p, generator=None):
        return raw

    def forward(self, raw) -> dict:
        return cond_dict()


class ClassConditioner(Conditioner):
    """Learned class embedding with one extra index (``num_classes``) as the null class for guidance."""

    batch_key = "label"

    def __init__(self, num_classes: int, embed_dim: int = 128):
        super().__init__()
        self.num_classes = num_classes
        self.vector_dim = embed_dim
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    @property
    def null_index(self) -> int:
        return self.num_classes

    def null_like(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.full_like(raw, self.null_index)

    def forward(self, raw: torch.Tensor) -> dict:
        if raw.min() < 0 or raw.max() > self.num_classes:
            raise ValueError(
                f"class labels must be in [0, {self.num_classes - 1}] (or {self.null_index} for null); got {raw.tolist()}"
            )
        return cond_dict(vector=self.embedding(raw.long()))
