"""Streaming, DDP-synced Frechet distance (and KID) in the feature space of ANY feature network.

``FrechetMetric(feature)`` computes FID with an Inception module, FVD with an I3D module, FD in a digit classifier's
features with that classifier: ``feature`` maps a batch to ``B x D`` features. States are float64 sums
(sum x, sum x x^T, count) reduced by summation across ranks, so the synced result equals the single-process one.
KID needs the feature vectors themselves; they are kept (float32, gathered across ranks) only when KID is on.

Real statistics can be cached per dataset / split / resolution / feature network in a ``.pt`` file (loadable with
``torch.load(weights_only=True)``) holding the mean, covariance, count (and features for KID) plus a key; a cache
whose key does not match the run's key is refused with ``StaleCacheError``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from difflab.metrics.common import is_rank_zero
from difflab.metrics.frechet import frechet_distance, kernel_inception_distance
from difflab.ops.atomic import atomic_torch_save
from difflab.utils.errors import CorruptDataError, DifflabError
from difflab.utils.frozen import Frozen

CACHE_FORMAT = "difflab-real-feature-stats-v1"
_KEY_TYPES = (str, int, float, bool, type(None))


class StaleCacheError(DifflabError):
    """A real-statistics cache was built for another dataset / resolution / feature network."""


class FrechetMetric(Metric):
    """Frechet distance between real and generated data in the features of ``feature`` (plus optional KID).

    Args:
        feature: module mapping an input batch to ``B x D`` features (held frozen, outside ``state_dict``; it is
            moved to each input's device on first use).
        num_features: D; read from ``feature.num_features`` when omitted.
        feature_name: names the feature network in cache keys (default ``<ClassName>-<D>``).
        kid_subsets: number of KID subsets; 0 turns KID off (and the feature vectors are not kept).
        kid_subset_size: KID subset size (capped at the smaller set size).
        kid_degree: degree of the KID polynomial kernel.
        kid_seed: seed of the subset draws (the same on all ranks, so all ranks report the same KID).
        reset_real_features: if False, ``reset()`` keeps the real statistics (compute them once per run).

    ``compute()`` returns ``{"frechet": ..., "kid_mean": ..., "kid_std": ...}`` (KID keys only when enabled); the
    caller names them (``fid``, ``fvd256_16f``, ...). Call ``compute`` on every rank: it syncs states.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        feature: nn.Module,
        num_features: int | None = None,
        *,
        feature_name: str | None = None,
        kid_subsets: int = 0,
        kid_subset_size: int = 1000,
        kid_degree: int = 3,
        kid_seed: int = 0,
        reset_real_features: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_features is None:
            num_features = getattr(feature, "num_features", None)
        if num_features is None:
            raise ValueError(
                f"FrechetMetric: cannot tell the feature width of {type(feature).__name__}; pass num_features=D "
                "or give the module a num_features attribute"
            )
        self._feature = Frozen(feature)
        self.num_features = int(num_features)
        self.feature_name = feature_name or f"{type(feature).__name__}-{self.num_features}"
        self.kid_subsets = int(kid_subsets)
        self.kid_subset_size = int(kid_subset_size)
        self.kid_degree = int(kid_degree)
        self.kid_seed = int(kid_seed)
        self.reset_real_features = reset_real_features
        d = self.num_features
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            if self.kid_enabled:
                self.add_state(f"{side}_features", [], dist_reduce_fx="cat")
        self._cached_real: dict[str, Tensor | int] | None = None
        self._cache_source: str | None = None

    @property
    def kid_enabled(self) -> bool:
        """Whether KID is computed (and feature vectors are kept)."""
        return self.kid_subsets > 0

    @property
    def has_real_stats(self) -> bool:
        """True when real statistics come from a loaded cache or from real updates on this rank."""
        return self._cached_real is not None or int(self.real_count) > 0

    # ---------------------------------------------------------------- updates
    def extract(self, x: Tensor) -> Tensor:
        """Run the feature network on ``x`` (no grad, on x's device) and check the ``B x D`` output."""
        if self._feature.device != x.device:
            self._feature.to(x.device)
        feats = self._feature(x)
        if feats.dim() != 2 or feats.shape != (x.shape[0], self.num_features):
            raise ValueError(
                f"feature network {self.feature_name} returned shape {tuple(feats.shape)} for a batch of "
                f"{x.shape[0]}; expected {x.shape[0]} x {self.num_features}"
            )
        return feats

    def update(self, x: Tensor, real: bool) -> None:  # type: ignore[override]
        """Add a batch of real (``real=True``) or generated data: features are extracted, then accumulated."""
        self.update_features(self.extract(x), real)

    def update_features(self, features: Tensor, real: bool) -> None:
        """Accumulate precomputed ``B x D`` features (e.g. extracted elsewhere) for the real or fake side."""
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"FrechetMetric expects B x {self.num_features} features, got {tuple(features.shape)}")
        if real and self._cached_real is not None:
            raise RuntimeError(
                f"real statistics were loaded from {self._cache_source}; do not also update with real data "
                "(build a new metric to recompute them)"
            )
        side = "real" if real else "fake"
        f = features.detach().to(device=self.real_sum.device, dtype=torch.float64)
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + f.sum(dim=0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + f.T @ f)
        setattr(self, f"{side}_count", getattr(self, f"{side}_count") + f.shape[0])
        if self.kid_enabled:
            getattr(self, f"{side}_features").append(f.to(torch.float32))

    # ---------------------------------------------------------------- statistics
    def _moments(self, side: str) -> tuple[Tensor, Tensor, int]:
        """Mean, unbiased covariance and count of one side from the (already synced) sums."""
        n = int(getattr(self, f"{side}_count"))
        if n < 2:
            raise RuntimeError(f"FrechetMetric needs at least 2 {side} samples, got {n}")
        mean = getattr(self, f"{side}_sum") / n
        cov = (getattr(self, f"{side}_outer") - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov, n

    def _real(self) -> dict[str, Any]:
        """Real statistics: the loaded cache if any, else the streamed states (assumed synced by the caller)."""
        device = self.real_sum.device
        if self._cached_real is not None:
            out = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self._cached_real.items()}
            return out
        mean, cov, n = self._moments("real")
        out = {"mean": mean, "cov": cov, "count": n}
        if self.kid_enabled:
            out["features"] = dim_zero_cat(self.real_features)
        return out

    def compute(self) -> dict[str, Tensor]:
        """Frechet distance (and KID) between the real statistics and everything generated so far."""
        real = self._real()
        mean_f, cov_f, _ = self._moments("fake")
        out = {"frechet": frechet_distance(real["mean"], real["cov"], mean_f, cov_f)}
        if self.kid_enabled:
            gen = torch.Generator().manual_seed(self.kid_seed)
            kid_mean, kid_std = kernel_inception_distance(
                real["features"],
                dim_zero_cat(self.fake_features),
                self.kid_subsets,
                self.kid_subset_size,
                self.kid_degree,
                generator=gen,
            )
            out["kid_mean"], out["kid_std"] = kid_mean, kid_std
        return out

    def reset(self) -> None:
        """Reset the fake side (and the real side unless ``reset_real_features=False``); a loaded cache stays."""
        if self.reset_real_features:
            super().reset()
            return
        names = ["real_sum", "real_outer", "real_count"] + (["real_features"] if self.kid_enabled else [])
        # torchmetrics empties list states in place (``list.clear``): keep copies of the lists, not references
        kept = {n: list(v) if isinstance(v := getattr(self, n), list) else v for n in names}
        super().reset()
        for n, v in kept.items():
            setattr(self, n, v)

    def real_statistics(self) -> dict[str, Any]:
        """Real mean / covariance / count (and features when KID is on), synced over ranks. Call on all ranks."""
        if self._cached_real is not None:
            return self._real()
        with self.sync_context(should_sync=True, should_unsync=True):
            return self._real()

    # ---------------------------------------------------------------- cache
    def cache_key(self, key: Mapping[str, Any]) -> dict[str, Any]:
        """The full cache key: the caller's description of the real data plus the feature network."""
        full = dict(key)
        full.update(feature=self.feature_name, num_features=self.num_features)
        for k, v in full.items():
            if not isinstance(k, str) or not isinstance(v, _KEY_TYPES):
                raise ValueError(f"real-stats cache key entry {k!r}={v!r} must map a str to str/int/float/bool/None")
        return full

    def save_real_stats(self, path: str | os.PathLike, key: Mapping[str, Any]) -> None:
        """Write the (synced) real statistics to ``path``; rank 0 writes, atomically. Call on all ranks.

        ``key`` describes the real data, e.g. ``{"dataset": "cifar10", "split": "train", "resolution": 32,
        "n": 50000}``; the feature network name and width are added.
        """
        stats = self.real_statistics()
        payload = {
            "format": CACHE_FORMAT,
            "key": self.cache_key(key),
            "mean": stats["mean"].detach().to("cpu", torch.float64),
            "cov": stats["cov"].detach().to("cpu", torch.float64),
            "count": int(stats["count"]),
        }
        if "features" in stats:
            payload["features"] = stats["features"].detach().to("cpu", torch.float32)
        if not is_rank_zero():
            return
        atomic_torch_save(payload, path)

    def load_real_stats(self, path: str | os.PathLike, key: Mapping[str, Any]) -> None:
        """Use cached real statistics from ``path``; refuse (StaleCacheError) a cache built for another key."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"real-stats cache {path} does not exist; compute real statistics first")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
            raise CorruptDataError(f"real-stats cache {path} cannot be read ({err}); delete it to recompute") from err
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise StaleCacheError(f"real-stats cache {path} is not a {CACHE_FORMAT} file; delete it to recompute")
        want = self.cache_key(key)
        have = data.get("key", {})
        if have != want:
            diff = {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)}
            detail = ", ".join(f"{k}: cached {a!r} vs needed {b!r}" for k, (a, b) in diff.items())
            raise StaleCacheError(f"real-stats cache {path} does not match this run ({detail}); delete it to recompute")
        if self.kid_enabled and "features" not in data:
            raise StaleCacheError(
                f"real-stats cache {path} has no feature vectors, which KID needs; delete it to recompute"
            )
        if int(self.real_count) > 0:
            raise RuntimeError("FrechetMetric already holds streamed real statistics; load the cache before updating")
        cached: dict[str, Tensor | int] = {"mean": data["mean"], "cov": data["cov"], "count": int(data["count"])}
        if self.kid_enabled:
            cached["features"] = data["features"]
        self._cached_real = cached
        self._cache_source = str(path)


def load_or_compute_real_stats(
    metric: FrechetMetric,
    path: str | os.PathLike | None,
    key: Mapping[str, Any],
    real_batches: Iterable[Tensor],
) -> str:
    """Load real statistics from ``path`` if it exists, else stream ``real_batches`` and write the cache.

    In DDP every rank calls this with its own shard of real batches and the same path (shared filesystem).
    Returns ``"loaded"`` or ``"computed"``. ``path=None`` computes without caching.
    """
    if path is not None and Path(path).is_file():
        metric.load_real_stats(path, key)
        return "loaded"
    for batch in real_batches:
        metric.update(batch, real=True)
    if path is not None:
        metric.save_real_stats(path, key)
    return "computed"
