"""Learned pooling of text token states into one conditioning vector."""

from __future__ import annotations

import torch
from torch import nn


class AttentionPool(nn.Module):
    """Single-query attention over token states, padding masked; returns a weighted mean of the tokens.

    A mean over tokens blurs one-word differences ("moving left" vs "moving right": pooled cosine 0.99 with MiniLM,
    while the two direction tokens differ clearly), and the pooled vector is what modulates every residual block
    through the timestep embedding. A learned query lets training weight the tokens that matter; Imagen adds an
    attention-pooled text vector to its timestep embedding for the same reason. The query starts at zero, so at
    initialisation the pool is exactly the masked mean.
    """

    def __init__(self, dim: int, key_dim: int = 64):
        super().__init__()
        self.key = nn.Linear(dim, key_dim)
        self.query = nn.Parameter(torch.zeros(key_dim))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``B x L x D`` tokens (and ``B x L`` mask, 1 = real token) -> ``B x D``."""
        scores = self.key(tokens) @ self.query.to(tokens.dtype) / self.query.numel() ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask.bool(), float("-inf"))
        weights = scores.float().softmax(dim=-1).to(tokens.dtype)
        return (weights.unsqueeze(-1) * tokens).sum(1)
