"""Metrics on generated samples (the evaluator behind ``difflab.callbacks.sample_metrics`` and ``report.py``): Frechet distance + KID in a configurable
feature space, LPIPS diversity, CLIP score (text models) and FVD (videos).

Feature spaces (``feature``):
- ``digit_classifier``: the repo's digit classifier (``src/eval/digit_classifier.pt``, 128-d); metrics
  ``fd_digit<N>`` / ``kd_digit<N>`` plus ``digit_accuracy`` (the classifier agrees with the sampled label). With
  ``second_opinions`` (default) also the independently trained second judge's (LeNet-style, ``digit_judge2.pt``)
  FD and accuracy (``fd_lenet<N>``, ``lenet_accuracy``), FD on raw pixels (``fd_pixel<N>``) and k-NN precision /
  recall (Kynkaanniemi et al. 2019, k=3, against the reference items) in both judges' features
  (``precision_digit<N>``, ``recall_digit<N>``, ``precision_lenet<N>``, ``recall_lenet<N>``), each with its
  real-vs-real floor.
- ``inception``: the FID Inception from a LOCAL weights file (``inception_weights``); ``fid<N>`` / ``kid<N>``.
- ``i3d``: the StyleGAN-V I3D TorchScript (``i3d_weights``) for videos; ``fvd<N>_<T>f`` / ``kvd<N>_<T>f``.
- ``auto`` (default): i3d for videos, the digit classifier for 1-channel images, Inception otherwise.
- any ``nn.Module`` mapping a batch to ``B x D`` features (with ``num_features``): ``fd_<name><N>``.
N is the number of generated samples; the numbers are only comparable at equal N.

Sampling is sharded across DDP ranks (rank r generates samples r, r + W, ...; the noise of sample i depends only on
i, so the set is the same for any world size). Feature statistics, accuracies and scores are summed over ranks
(torchmetrics states / all_reduce), so FD equals the single-process value. LPIPS diversity averages random pairs
drawn within each rank's samples. Real statistics are computed once from ``n_real`` items of the datamodule's
``real_split`` and cached in ``stats_dir`` (per dataset config / split / resolution / feature network / N).
Missing weights: that metric is skipped with one warning naming the file to provide; training continues.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.metrics.clip_score import ClipScoreMetric, load_clip_scorer
from difflab.metrics.common import warn_once
from difflab.metrics.digit_features import DigitFeatures, DigitJudge2Features, PixelFeatures
from difflab.metrics.dinov2 import build_dinov2_metric
from difflab.metrics.feature_metrics import FrechetMetric
from difflab.metrics.fvd import build_fvd_metric, fvd_metric_name
from difflab.metrics.inception import build_fid_metric
from difflab.metrics.lpips_metric import build_lpips, lpips_distance
from difflab.metrics.precision_recall import precision_recall
from difflab.metrics.protocol import describe_feature
from difflab.ops.atomic import atomic_write
from difflab.ops.distributed import all_sum, barrier, broadcast_flag, dist_info
from difflab.utils.conditions import condition_key

log = logging.getLogger(__name__)

LOADER_ONLY_KEYS = {"batch_size", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor"}


FEATURE_KINDS = ("auto", "digit_classifier", "inception", "dinov2", "i3d", "none")
MAX_PIXEL_FEATURES = 4096  # FD on raw pixels only up to this many values per sample (its covariance is D x D)
PR_K = 3  # neighbours of k-NN precision / recall (Kynkaanniemi et al. 2019)


def resolve_feature_kind(feature: Any, sample_shape) -> str:
    """'digit_classifier' | 'inception' | 'dinov2' | 'i3d' | 'none' | 'module' for a configured ``feature``."""
    if isinstance(feature, nn.Module):
        return "module"
    kinds = FEATURE_KINDS
    if feature not in kinds:
        raise ValueError(f"sample_metrics.feature={feature!r}: choose one of {kinds} or give a _target_ module")
    if feature != "auto":
        return feature
    if len(sample_shape) == 4:
        return "i3d"
    return "digit_classifier" if sample_shape[0] == 1 else "inception"


def metric_names(kind: str, n: int, sample_shape, feature_name: str = "") -> tuple[str, str]:
    """(Frechet name, KID name) carrying the sample count (and frame count for videos)."""
    if kind == "i3d":
        fvd = fvd_metric_name(n, sample_shape[1])
        return fvd, "k" + fvd[1:]  # fvd256_16f -> kvd256_16f
    if kind == "inception":
        return f"fid{n}", f"kid{n}"
    if kind == "digit_classifier":
        return f"fd_digit{n}", f"kd_digit{n}"
    if kind == "dinov2":
        return f"fd_dinov2{n}", f"kd_dinov2{n}"
    slug = re.sub(r"[^a-z0-9]+", "_", feature_name.lower()).strip("_") or "custom"
    return f"fd_{slug}{n}", f"kd_{slug}{n}"


def _describe_sampler(sampler) -> str | None:
    """``ddim(steps=8)`` for a configured partial sampler; None for the model's own."""
    if sampler is None:
        return None
    func = getattr(sampler, "func", sampler)
    keywords = getattr(sampler, "keywords", {}) or {}
    args = ", ".join(f"{k}={v}" for k, v in sorted(keywords.items()))
    return f"{getattr(func, '__name__', type(func).__name__)}({args})"


# ------------------------------------------------------------------------------------------------ LPIPS
def load_lpips(net: str | None, backbone: str | os.PathLike | None = None):
    """LPIPS with a local backbone file (None: torch hub's cache path); None (one warning) when it is missing."""
    if not net:
        return None
    return build_lpips(net, backbone_weights=backbone)


# ------------------------------------------------------------------------------------------------ evaluator
def _slug(feature_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", feature_name)


def _gather_strided(local: torch.Tensor, n: int, rank: int, world: int) -> torch.Tensor:
    """Every rank's rows of items ``rank, rank + world, ...`` (this rank's ``local``) put back in item order on all
    ranks: an ``n x D`` tensor, the same on every rank (one all_reduce of a zero-padded copy)."""
    full = torch.zeros((n, *local.shape[1:]), dtype=torch.float64, device=local.device)
    full[rank::world][: len(local)] = local.to(torch.float64)
    return all_sum(full)


def _rows(batches: list[torch.Tensor], metric: FrechetMetric) -> torch.Tensor:
    """This rank's feature rows (none when it drew no items: it still joins the gather)."""
    return torch.cat(batches) if batches else torch.zeros(0, metric.num_features, device=metric.real_sum.device)


def _dataset_key(module, datamodule) -> tuple[str, str]:
    """(dataset class name, short hash of its config without loader-only keys) naming the real data."""
    cfg = dict(((getattr(module, "run_config", None) or {}).get("datamodule")) or {})
    if not cfg:
        cfg = {"_target_": type(datamodule).__name__, "data_dir": str(getattr(datamodule, "data_dir", ""))}
    cfg = {k: v for k, v in cfg.items() if k not in LOADER_ONLY_KEYS}
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return type(datamodule).__name__, digest


class SampleMetrics:
    """Generates ``n_samples`` with a module and computes every metric that its data and the available weights
    allow. ``prepare`` (real statistics, once) and ``evaluate`` must be called on every DDP rank."""

    def __init__(
        self,
        n_samples: int = 100,
        batch_size: int = 128,
        feature: Any = "auto",
        inception_weights: str | None = None,
        i3d_weights: str | None = None,
        dinov2_weights: str | None = None,
        digit_classifier_weights: str | None = None,
        kid_subsets: int = 10,
        kid_subset_size: int = 50,
        n_real: int = 1024,
        real_split: str = "train",
        stats_dir: str | None = None,
        lpips_net: str | None = "alex",
        lpips_backbone: str | None = None,
        lpips_pairs: int = 32,
        clip_model: str | None = None,
        sampler=None,
        guidance_scale: float | None = None,
        seed: int = 0,
        guidance: dict | None = None,
        second_opinions: bool = True,
    ):
        if n_samples < 2:
            raise ValueError(f"sample_metrics.n_samples must be >= 2; got {n_samples}")
        if real_split not in ("train", "val"):
            raise ValueError(f"sample_metrics.real_split must be train or val; got {real_split!r}")
        self.n_samples, self.batch_size = int(n_samples), int(batch_size)
        self.feature = feature
        self.inception_weights, self.i3d_weights = inception_weights, i3d_weights
        self.dinov2_weights = dinov2_weights
        self.digit_classifier_weights = digit_classifier_weights
        self.kid_subsets, self.kid_subset_size = int(kid_subsets), int(kid_subset_size)
        self.n_real, self.real_split, self.stats_dir = int(n_real), real_split, stats_dir
        self.lpips_net, self.lpips_backbone, self.lpips_pairs = lpips_net, lpips_backbone, int(lpips_pairs)
        self.clip_model = clip_model
        self.sampler, self.guidance_scale, self.seed = sampler, guidance_scale, int(seed)
        self.guidance = dict(guidance) if guidance else None  # overrides of the guidance group (method and its keys)
        self.metric = None
        self.second_opinions = bool(second_opinions)
        self.extras: dict[str, FrechetMetric] = {}  # second opinions: metric stem (fd_lenet, fd_pixel) -> metric
        self.pr_judges: dict[str, str] = {}  # precision / recall in these features: slug -> key in _metrics()
        self._pr_reference: dict[str, torch.Tensor] = {}  # slug -> features of the reference items (all ranks)
        self.kind = None
        self.names: tuple[str, str] | None = None
        self.real_source: str | None = None
        self.floor: dict[str, float] = {}  # real-vs-real values at n_samples (FD, and KID when on)
        self.protocol: dict[str, dict[str, Any]] = {}  # metric name -> how it is measured (metrics/protocol.py)
        self._prepared = False
        self._lpips = None
        self._clip = None

    # ------------------------------------------------------------------ set-up
    def _build_metric(self, module) -> None:
        shape = tuple(module.diffusion.sample_shape)
        self.kind = resolve_feature_kind(self.feature, shape)
        kw = dict(kid_subsets=self.kid_subsets, kid_subset_size=self.kid_subset_size, reset_real_features=False)
        if self.kind == "none":
            self.metric = None
        elif self.kind == "digit_classifier":
            if len(shape) != 3:
                raise ValueError(f"sample_metrics.feature=digit_classifier needs images, got sample shape {shape}")
            self.metric = FrechetMetric(
                DigitFeatures(self.digit_classifier_weights), feature_name="digit-classifier-128", **kw
            )
        elif self.kind == "inception":
            self.metric = build_fid_metric(self.inception_weights, **kw)
        elif self.kind == "dinov2":
            if len(shape) != 3:
                raise ValueError(f"sample_metrics.feature=dinov2 needs images, got sample shape {shape}")
            self.metric = build_dinov2_metric(self.dinov2_weights, **kw)
        elif self.kind == "i3d":
            if len(shape) != 4:
                raise ValueError(f"sample_metrics.feature=i3d needs videos (C x T x H x W), got sample shape {shape}")
            self.metric = build_fvd_metric(self.i3d_weights, **kw)
        else:
            self.metric = FrechetMetric(self.feature, **kw)
        if self.metric is not None:
            self.metric = self.metric.to(module.device)
            self.names = metric_names(self.kind, self.n_samples, shape, self.metric.feature_name)
        if self.kind == "digit_classifier" and self.second_opinions:
            self._build_second_opinions(module, shape)

    def _build_second_opinions(self, module, shape) -> None:
        """The second judge's and raw pixels' Frechet metrics, and the features precision / recall are taken in."""
        self.extras = {
            "fd_lenet": FrechetMetric(
                DigitJudge2Features(), feature_name="digit-judge2-lenet-84", reset_real_features=False
            )
        }
        pixels = PixelFeatures(shape)
        if pixels.num_features <= MAX_PIXEL_FEATURES:
            name = "pixels-" + "x".join(map(str, pixels.sample_shape))
            self.extras["fd_pixel"] = FrechetMetric(pixels, feature_name=name, reset_real_features=False)
        self.extras = {k: m.to(module.device) for k, m in self.extras.items()}
        if min(self.n_samples, self.n_real) > PR_K:  # each set needs k + 1 points for its k-NN radii
            self.pr_judges = {"digit": "", "lenet": "fd_lenet"}
        else:
            warn_once(
                "pr-too-few",
                f"k-NN precision / recall skipped: they need n_samples and n_real > {PR_K} "
                f"(got {self.n_samples} and {self.n_real})",
            )

    def _real_loader(self, datamodule, rank: int, world: int, start: int = 0, count: int | None = None):
        """Batches of this rank's share of real items ``start .. start + count`` of a fixed (seeded) order of the
        real split; returns (number of items, batches, whether they overlap items ``0 .. n_real``).

        Items ``0 .. n_real`` are the reference set; the floor's real samples come right after it, so the two sets
        are disjoint when the split is large enough (else the floor takes the last items and says it overlaps)."""
        from torch.utils.data import DataLoader, Subset

        count = self.n_real if count is None else count
        loader = datamodule.train_dataloader() if self.real_split == "train" else datamodule.val_dataloader()
        dataset = getattr(loader, "dataset", None)
        if (
            dataset is not None
            and hasattr(dataset, "__len__")
            and not isinstance(dataset, torch.utils.data.IterableDataset)
        ):
            size = len(dataset)
            start = min(start, max(0, size - count))
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed))[start : start + count]
            mine = order[rank::world].tolist()
            overlap = start < min(self.n_real, size)  # only meaningful for the floor's items
            return (
                len(order),
                DataLoader(
                    Subset(dataset, mine),
                    batch_size=self.batch_size,
                    shuffle=False,
                    collate_fn=loader.collate_fn,
                    num_workers=0,
                ),
                overlap,
            )

        def strided():  # iterable datasets: items start .. start + count in loader order, dealt out to ranks
            i = 0
            for batch in loader:
                b = batch["x"].shape[0]
                keep = [j for j in range(b) if start <= i + j < start + count and (i + j - start) % world == rank]
                if keep:
                    yield {"x": batch["x"][keep]}
                i += b
                if i >= start + count:
                    return

        return count, strided(), False

    def prepare(self, module, datamodule, run_dir: str | os.PathLike) -> None:
        """Build the feature metric and load or compute the real statistics (once; all ranks)."""
        if self._prepared:
            return
        self._prepared = True
        self._build_metric(module)
        key = condition_key(module)
        if key == "text":
            scorer = load_clip_scorer(self.clip_model)
            self._clip = None if scorer is None else ClipScoreMetric(scorer).to(module.device)
        self._lpips = load_lpips(self.lpips_net, self.lpips_backbone)
        if self.metric is None:
            return
        if datamodule is None:
            raise ValueError("sample metrics need the datamodule for real statistics (none attached to the trainer)")
        rank, world = dist_info()
        n_real, batches, _ = self._real_loader(datamodule, rank, world)
        dataset, digest = _dataset_key(module, datamodule)
        res = "x".join(str(s) for s in module.diffusion.sample_shape)
        cache_key = {"dataset": dataset, "config": digest, "split": self.real_split, "resolution": res, "n": n_real}
        stats_dir = Path(self.stats_dir) if self.stats_dir else Path(run_dir) / "stats"
        metrics = self._metrics()
        paths = {
            k: stats_dir / f"{dataset}-{digest}-{self.real_split}-{res}-{_slug(m.feature_name)}-n{n_real}.pt"
            for k, m in metrics.items()
        }
        cached = {k: broadcast_flag(p.is_file(), module.device) for k, p in paths.items()}
        for k, m in metrics.items():
            if cached[k]:
                m.load_real_stats(paths[k], cache_key)
        needed = {k for k in metrics if not cached[k]} | set(self.pr_judges.values())
        pr_features: dict[str, list[torch.Tensor]] = {slug: [] for slug in self.pr_judges}
        if needed:  # one pass over the reference items serves every metric
            with torch.no_grad():
                for batch in batches:
                    x = module.diffusion.to_pixels(batch["x"].to(module.device)).clamp(-1, 1)
                    feats = {k: metrics[k].extract(x) for k in needed}
                    for k, f in feats.items():
                        if not cached[k]:
                            metrics[k].update_features(f, real=True)
                    for slug, k in self.pr_judges.items():
                        pr_features[slug].append(feats[k])
        sources = {
            k: f"loaded {paths[k]}" if cached[k] else self._save_real_stats(m, paths[k], cache_key)
            for k, m in metrics.items()
        }
        self.real_source = sources[""]
        self._pr_reference = {
            slug: _gather_strided(_rows(fs, metrics[self.pr_judges[slug]]), n_real, rank, world)
            for slug, fs in pr_features.items()
        }
        if not all(cached.values()):
            barrier()
        log.info("sample metrics: real statistics %s", self.real_source)
        floor_cache = paths[""].with_name(paths[""].stem + f"-floor-n{self.n_samples}.json")
        overlap = self._compute_floor(module, datamodule, floor_cache)
        self._describe(module, {**cache_key, "n": n_real}, overlap)

    def _metrics(self) -> dict[str, FrechetMetric]:
        """Every Frechet metric of this run: the main one (key "") and the second opinions (by metric stem)."""
        return {"": self.metric, **self.extras}

    @staticmethod
    def _save_real_stats(metric: FrechetMetric, path: Path, cache_key: dict) -> str:
        """Cache freshly computed real statistics (a cache that cannot be written costs a recomputation per run);
        returns where the statistics came from."""
        try:
            metric.save_real_stats(path, cache_key)
            return f"computed and cached in {path}"
        except OSError as err:
            warn_once(
                f"stats-cache:{path}",
                f"could not write the real-statistics cache {path} ({err}); "
                "they are recomputed in every run: set sample_metrics.stats_dir",
            )
            return "computed (not cached)"

    def _compute_floor(self, module, datamodule, cache: Path) -> bool:
        """The real-vs-real value at ``n_samples``: real items that are not in the reference set, scored like
        generated samples. What a perfect generator would get at this sample count (cached next to the real
        statistics). Returns whether those items overlap the reference set (small datasets)."""
        rank, world = dist_info()
        n, batches, overlap = self._real_loader(datamodule, rank, world, start=self.n_real, count=self.n_samples)
        metrics = self._metrics()
        wanted = {"frechet", *self.extras, *(f"{m}_{slug}" for slug in self.pr_judges for m in ("precision", "recall"))}
        if broadcast_flag(cache.is_file(), module.device):
            try:
                saved = json.loads(cache.read_text())
                floor, overlap = {k: float(v) for k, v in saved["floor"].items()}, bool(saved["overlap"])
                if wanted <= set(floor):  # a cache written without some of today's metrics is recomputed
                    self.floor = floor
                    return overlap
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable: recompute (every rank reads the same file, so all take this branch)
        pr_features: dict[str, list[torch.Tensor]] = {slug: [] for slug in self.pr_judges}
        with torch.no_grad():
            for batch in batches:
                x = module.diffusion.to_pixels(batch["x"].to(module.device)).clamp(-1, 1)
                feats = {k: m.extract(x) for k, m in metrics.items()}
                for k, f in feats.items():
                    metrics[k].update_features(f, real=False)
                for slug, k in self.pr_judges.items():
                    pr_features[slug].append(feats[k])
        self.floor = {}
        for k, m in metrics.items():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*was called before the ``update``")
                res = m.compute()
            m.reset()
            self.floor[k or "frechet"] = float(res["frechet"])
            if not k and "kid_mean" in res:
                self.floor["kid"] = float(res["kid_mean"])
        for slug, fs in pr_features.items():
            rows = _rows(fs, metrics[self.pr_judges[slug]])
            self.floor.update(self._precision_recall(slug, _gather_strided(rows, n, rank, world)))
        if rank == 0:
            try:
                text = json.dumps({"floor": self.floor, "overlap": overlap, "n": n})
                atomic_write(cache, lambda tmp: Path(tmp).write_text(text))
            except OSError:
                pass  # no cache: recomputed next run (cheap: n_samples real items)
        return overlap

    def _precision_recall(self, slug: str, generated: torch.Tensor) -> dict[str, float]:
        """k-NN precision and recall of ``generated`` features against the reference items' (keys ``precision_<slug>``,
        ``recall_<slug>``)."""
        precision, recall = precision_recall(self._pr_reference[slug], generated, k=PR_K)
        return {f"precision_{slug}": precision, f"recall_{slug}": recall}

    def _describe(self, module, reference: dict[str, Any], floor_overlaps: bool) -> None:
        """Fill ``self.protocol``: how each Frechet / KID metric of this run is measured (metrics/protocol.py)."""
        fd_name, kd_name = self.names
        common = {
            **self.generation(module),
            "feature": self.metric.feature_name,
            **describe_feature(self.metric._feature.module),
            "reference": reference,
            "floor_real_items_overlap_reference": floor_overlaps,
        }
        self.protocol = {
            f"metrics/{fd_name}": {
                **common,
                "floor": self.floor.get("frechet"),
                "floor_metric": f"metrics/{fd_name}_floor",
            }
        }
        if "kid" in self.floor:
            self.protocol[f"metrics/{kd_name}"] = {
                **common,
                "floor": self.floor["kid"],
                "floor_metric": f"metrics/{kd_name}_floor",
            }
        n = self.n_samples
        for stem, metric in self.extras.items():
            self.protocol[f"metrics/{stem}{n}"] = {
                **common,
                "feature": metric.feature_name,
                **describe_feature(metric._feature.module),
                "floor": self.floor.get(stem),
                "floor_metric": f"metrics/{stem}{n}_floor",
            }
        for slug, key in self.pr_judges.items():
            metric = self._metrics()[key]
            for kind in ("precision", "recall"):
                self.protocol[f"metrics/{kind}_{slug}{n}"] = {
                    **common,
                    "feature": f"{metric.feature_name}, k-NN k={PR_K} (Kynkaanniemi et al. 2019)",
                    **describe_feature(metric._feature.module),
                    "floor": self.floor.get(f"{kind}_{slug}"),
                    "floor_metric": f"metrics/{kind}_{slug}{n}_floor",
                }

    def generation(self, module) -> dict[str, Any]:
        """How the evaluated samples are drawn: their number, evaluation seed (the same noise and labels in every
        run with this seed, so a sweep's arms are compared on the same noise), sampler and guidance."""
        g = module.diffusion.guidance_for(self.guidance)
        scale = self.guidance_scale if self.guidance_scale is not None else g.scale
        return {
            "n_samples": self.n_samples,
            "eval_seed": self.seed,
            "sampler": _describe_sampler(self.sampler) or "the model's sampler",
            "guidance": f"{g.name} {scale}",
        }

    def scored_protocol(self, module, names) -> dict[str, dict[str, Any]]:
        """Protocol entries for the metrics in ``names`` that score samples without a reference set (digit accuracy,
        CLIP score, LPIPS diversity) and have none yet: how the samples were drawn and which network judged them."""
        judges = {
            "metrics/digit_accuracy": lambda: {
                "feature": self.metric.feature_name,
                **describe_feature(self.metric._feature.module),
            },
            "metrics/lenet_accuracy": lambda: {
                "feature": self.extras["fd_lenet"].feature_name,
                **describe_feature(self.extras["fd_lenet"]._feature.module),
            },
            "metrics/clip_score": lambda: {"feature": f"clip {self.clip_model or 'default'}"},
            "metrics/lpips_diversity": lambda: {"feature": f"lpips {self.lpips_net}", "pairs": self.lpips_pairs},
        }
        return {
            name: {**self.generation(module), **judges[name]()}
            for name in names
            if name in judges and name not in self.protocol
        }

    # ------------------------------------------------------------------ evaluation
    def _noise(self, indices: list[int], shape) -> torch.Tensor:
        """Noise of each sample from its global index alone (the same set for any number of ranks)."""
        return torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + i)) for i in indices]
        )

    def _hits(self, key: str, feats: dict[str, torch.Tensor], labels: torch.Tensor) -> float:
        """How many samples the judge behind metric ``key`` reads as their requested label (0 without that judge)."""
        if key not in feats:
            return 0.0
        pred = self._metrics()[key]._feature.module.predict(feats[key])
        return float((pred == labels.to(pred.device)).sum())

    def _second_opinions(self, pr_features: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """The second opinions' Frechet distances and the k-NN precision / recall of the generated set, with floors."""
        rank, world = dist_info()
        n, out = self.n_samples, {}
        for stem, metric in self.extras.items():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*was called before the ``update``")
                out[f"metrics/{stem}{n}"] = float(metric.compute()["frechet"])
            metric.reset()
        for slug, fs in pr_features.items():
            local = _rows(fs, self._metrics()[self.pr_judges[slug]])
            out.update(
                {
                    f"metrics/{k}{n}": v
                    for k, v in self._precision_recall(slug, _gather_strided(local, n, rank, world)).items()
                }
            )
        for name in list(out):
            stem = name[len("metrics/") : -len(str(n))]
            if stem in self.floor:
                out[f"{name}_floor"] = self.floor[stem]
        return out

    @torch.no_grad()
    def evaluate(self, module) -> dict[str, float]:
        """Generate this rank's share of the samples and return every metric (the same values on all ranks)."""
        rank, world = dist_info()
        device = module.device
        n = self.n_samples
        raw_all = module.diffusion.default_conditions(n)
        mine = list(range(rank, n, world))
        gen = torch.Generator().manual_seed(self.seed + 7919 * (rank + 1))
        correct = torch.zeros(3, dtype=torch.float64, device=device)  # (classifier agrees, LeNet agrees, counted)
        pr_features: dict[str, list[torch.Tensor]] = {slug: [] for slug in self.pr_judges}
        metrics = self._metrics()
        kept: list[torch.Tensor] = []
        keep_n = 2 * self.lpips_pairs if self._lpips is not None else 0
        check_labels = (
            self.kind == "digit_classifier"
            and condition_key(module) == "label"
            and getattr(module.conditioner, "num_classes", None) == 10
        )
        for i in range(0, len(mine), self.batch_size):
            idx = mine[i : i + self.batch_size]
            if torch.is_tensor(raw_all):
                raw = raw_all[torch.tensor(idx, device=raw_all.device)]
            elif raw_all is not None:
                raw = [raw_all[j] for j in idx]
            else:
                raw = None
            x = module.diffusion.sample(
                module,
                len(idx),
                raw,
                sampler=self.sampler,
                guidance=self.guidance,
                guidance_scale=self.guidance_scale,
                generator=gen,
                noise=self._noise(idx, tuple(module.diffusion.sample_shape)),
            )
            if self.metric is not None:
                feats = {k: m.extract(x) for k, m in metrics.items()}
                for k, f in feats.items():
                    metrics[k].update_features(f, real=False)
                for slug, k in self.pr_judges.items():
                    pr_features[slug].append(feats[k])
                if check_labels:
                    hits = [self._hits(k, feats, raw) for k in ("", "fd_lenet")]
                    correct += torch.tensor([*hits, float(len(idx))], dtype=torch.float64, device=device)
            if self._clip is not None:
                self._clip.update(x, list(raw))
            if len(kept) < keep_n:
                kept.extend(x[: keep_n - len(kept)])
        out: dict[str, float] = {}
        if self.metric is not None:
            with warnings.catch_warnings():  # fake features go in through update_features, which torchmetrics
                warnings.filterwarnings("ignore", message=".*was called before the ``update``")  # does not count
                res = self.metric.compute()
            fd_name, kd_name = self.names
            out[f"metrics/{fd_name}"] = float(res["frechet"])
            if "frechet" in self.floor:
                out[f"metrics/{fd_name}_floor"] = self.floor["frechet"]
            if "kid_mean" in res:
                out[f"metrics/{kd_name}"] = float(res["kid_mean"])
                out[f"metrics/{kd_name}_std"] = float(res["kid_std"])
                if "kid" in self.floor:
                    out[f"metrics/{kd_name}_floor"] = self.floor["kid"]
            self.metric.reset()
            out.update(self._second_opinions(pr_features))
            if check_labels:
                c = all_sum(correct)
                out["metrics/digit_accuracy"] = float(c[0] / c[2].clamp(min=1))
                if self.extras:
                    out["metrics/lenet_accuracy"] = float(c[1] / c[2].clamp(min=1))
        if self._clip is not None:
            out["metrics/clip_score"] = float(self._clip.compute())
            self._clip.reset()
        if self._lpips is not None:
            div = torch.zeros(2, dtype=torch.float64, device=device)
            if len(kept) >= 2:
                samples = torch.stack(kept)
                g = torch.Generator().manual_seed(self.seed + rank)
                a = torch.randint(0, len(samples), (self.lpips_pairs,), generator=g)
                b = (a + torch.randint(1, len(samples), (self.lpips_pairs,), generator=g)) % len(samples)
                d = lpips_distance(self._lpips, samples[a.to(device)], samples[b.to(device)])
                div += torch.tensor([float(d.double().sum()), float(d.numel())], dtype=torch.float64, device=device)
            div = all_sum(div)
            if div[1] > 0:
                out["metrics/lpips_diversity"] = float(div[0] / div[1])
        return out
