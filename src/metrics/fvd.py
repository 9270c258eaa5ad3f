"""FVD: Frechet distance in the features of the StyleGAN-V I3D TorchScript, loaded from a LOCAL file.

``i3d_torchscript.pt`` (StyleGAN-V / universome's port of the TF-hub i3d-kinetics-400 used by the original FVD)
is called as ``detector(videos, rescale=True, resize=True, return_features=True)`` on uint8 videos
``B x 3 x T x H x W`` in [0, 255]; with these flags it maps pixels to [-1, 1] and resizes frames to 224 itself, and
returns the 400-d pre-softmax features. This is the call in StyleGAN-V's ``src/metrics/frechet_video_distance.py``
(its generator output goes through ``(x * 127.5 + 128).clamp(0, 255).to(uint8)`` first). Other codebases (TATS,
common_metrics_on_video_quality) instead resize / rescale themselves and pass ``rescale=False, resize=False``.
The FVD number depends on the sample count and frame count: name it with ``fvd_metric_name``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from difflab.metrics.common import to_uint8, warn_once
from difflab.metrics.feature_metrics import FrechetMetric
from difflab.utils.errors import CheckpointError

I3D_FILENAME = "i3d_torchscript.pt"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"


def fvd_metric_name(n_samples: int, n_frames: int) -> str:
    """The conventional FVD name carrying the sample and frame counts, e.g. ``fvd2048_16f``."""
    if int(n_samples) < 1 or int(n_frames) < 1:
        raise ValueError(f"fvd_metric_name needs positive counts, got n_samples={n_samples}, n_frames={n_frames}")
    return f"fvd{int(n_samples)}_{int(n_frames)}f"


class I3DFeatures(nn.Module):
    """400-d I3D features of videos ``B x C x T x H x W`` (C in {1, 3}) in [-1, 1] or uint8."""

    num_features = 400
    resize = "uint8 quantisation, grey repeated to RGB, frames resized to 224x224 inside the I3D (resize=True)"

    def __init__(self, detector: nn.Module, weights_path: str | os.PathLike | None = None):
        super().__init__()
        self.detector = detector
        self.weights_path = weights_path

    def forward(self, videos: Tensor) -> Tensor:
        if videos.dim() != 5 or videos.shape[1] not in (1, 3):
            raise ValueError(f"I3DFeatures expects B x 1|3 x T x H x W videos, got {tuple(videos.shape)}")
        v = to_uint8(videos)
        if v.shape[1] == 1:
            v = v.expand(-1, 3, -1, -1, -1)
        try:
            feats = self.detector(v.contiguous(), rescale=True, resize=True, return_features=True)
        except RuntimeError as err:
            raise RuntimeError(
                f"I3D failed on videos of shape {tuple(videos.shape)} (it needs enough frames for its temporal "
                f"pooling; 16 is standard): {err}"
            ) from err
        return feats.to(torch.float32)


def load_i3d(weights_path: str | os.PathLike | None) -> I3DFeatures | None:
    """Load the I3D TorchScript from ``weights_path``; None (with one warning) when the file is missing."""
    path = Path(weights_path) if weights_path else None
    if path is None or not path.is_file():
        warn_once(
            f"i3d-missing:{path}",
            f"FVD skipped: I3D weights not found at {path}; download {I3D_FILENAME} from {I3D_URL} and set "
            "metrics.i3d_weights=<path>",
        )
        return None
    try:
        detector = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - not a TorchScript archive
        raise CheckpointError(
            f"{path} is not a TorchScript I3D ({err}); re-download {I3D_FILENAME} from {I3D_URL}"
        ) from err
    return I3DFeatures(detector.eval(), weights_path=path).eval()


def build_fvd_metric(weights_path: str | os.PathLike | None, **metric_kwargs) -> FrechetMetric | None:
    """A streaming FVD (``FrechetMetric`` on I3D features; KID on them is KVD), or None when weights are missing."""
    features = load_i3d(weights_path)
    if features is None:
        return None
    metric_kwargs.setdefault("feature_name", "i3d-kinetics400-stylegan-v")
    return FrechetMetric(features, **metric_kwargs)
