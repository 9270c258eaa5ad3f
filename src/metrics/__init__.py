"""Sample-quality metrics: Frechet distance / KID on any features (FID, FVD, digit FD), LPIPS, CLIP score."""

from difflab.metrics.feature_metrics import FrechetMetric, StaleCacheError, load_or_compute_real_stats
from difflab.metrics.frechet import frechet_distance, gaussian_stats, kernel_inception_distance
from difflab.metrics.fvd import build_fvd_metric, fvd_metric_name, load_i3d
from difflab.metrics.inception import build_fid_metric, load_inception

__all__ = [
    "FrechetMetric",
    "StaleCacheError",
    "build_fid_metric",
    "build_fvd_metric",
    "frechet_distance",
    "fvd_metric_name",
    "gaussian_stats",
    "kernel_inception_distance",
    "load_i3d",
    "load_inception",
    "load_or_compute_real_stats",
]
