"""k-NN precision and recall (Kynkaanniemi et al. 2019, arXiv 1904.06991): how much of the generated set lies on the
real data's manifold (precision: fidelity) and how much of the real set lies on the generated one (recall:
diversity), each manifold the union of balls around its points reaching their k-th nearest neighbour (k = 3)."""

from __future__ import annotations

import torch
from torch import Tensor

BATCH = 2048  # rows of the distance matrix held at once (float64: 2048 x N x 8 bytes)


def knn_radii(features: Tensor, k: int = 3) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set, itself excluded."""
    x = features.to(torch.float64)
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k-NN radii need 1 <= k < the number of points; got k={k} for {x.shape[0]} points")
    radii = [torch.cdist(x[i : i + BATCH], x).kthvalue(k + 1, dim=1).values for i in range(0, x.shape[0], BATCH)]
    return torch.cat(radii)


def manifold_coverage(reference: Tensor, radii: Tensor, queries: Tensor) -> float:
    """Fraction of ``queries`` inside at least one ball (centre in ``reference``, radius in ``radii``; the boundary
    counts as inside, as the authors' code does)."""
    ref, r = reference.to(torch.float64), radii.to(torch.float64)
    q = queries.to(torch.float64)
    inside = [(torch.cdist(q[i : i + BATCH], ref) <= r).any(dim=1) for i in range(0, q.shape[0], BATCH)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: Tensor, generated: Tensor, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of generated features against real ones (N x D each, any feature space)."""
    precision = manifold_coverage(real, knn_radii(real, k), generated)
    recall = manifold_coverage(generated, knn_radii(generated, k), real)
    return precision, recall
