"""k-NN precision and recall against the paper's definition re-typed with plain loops, and the cases whose answer
is known."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.metrics.precision_recall import knn_radii, manifold_coverage, precision_recall


def _reference(real: list[list[float]], fake: list[list[float]], k: int) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019, Eq. 1-2, point by point: f(phi, Phi) = 1 when ||phi - phi'|| <= ||phi' - NN_k(phi')||
    for some phi' in Phi."""

    def radius(points, i):
        d = sorted(math.dist(points[i], points[j]) for j in range(len(points)) if j != i)
        return d[k - 1]

    def inside(point, points):
        return any(math.dist(point, p) <= radius(points, i) for i, p in enumerate(points))

    precision = sum(inside(g, real) for g in fake) / len(fake)
    recall = sum(inside(r, fake) for r in real) / len(real)
    return precision, recall


@pytest.mark.parametrize("seed, shift", [(0, 0.0), (1, 0.7), (2, 2.5)])
def test_matches_the_definition_point_by_point(seed, shift):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(40, 3, generator=g, dtype=torch.float64)
    fake = torch.randn(30, 3, generator=g, dtype=torch.float64) * 1.5 + shift
    expected = _reference(real.tolist(), fake.tolist(), k=3)
    assert precision_recall(real, fake, k=3) == pytest.approx(expected, abs=1e-12)


def test_known_cases():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 8, generator=g)
    assert precision_recall(x, x) == (1.0, 1.0)  # every point is the centre of a ball
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)  # two far-apart clouds share nothing
    collapsed = x[:5].repeat(10, 1) + 1e-6 * torch.randn(50, 8, generator=g)  # mode collapse onto 5 real points
    precision, recall = precision_recall(x, collapsed)
    assert precision == 1.0 and recall < 0.5  # faithful but not diverse


def test_radii_exclude_the_point_itself_and_batches_agree():
    pts = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(pts, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(pts, k=2).tolist() == [3.0, 2.0, 3.0, 6.0]
    big = torch.randn(3000, 4, generator=torch.Generator().manual_seed(0))
    full = torch.cdist(big.double(), big.double()).kthvalue(4, dim=1).values
    torch.testing.assert_close(knn_radii(big, k=3), full)  # 2 batches of rows = one matrix
    assert manifold_coverage(pts, torch.zeros(4), torch.tensor([[3.0], [3.5]])) == 0.5  # the boundary is inside
    with pytest.raises(ValueError, match="1 <= k < the number of points"):
        knn_radii(pts, k=4)
