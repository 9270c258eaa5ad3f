"""FID Inception-v3 feature extractor, built from a LOCAL weights file (no download at run time).

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (a port of the TF 2015-12-05 graph that the
original FID uses, with TF1-compatible bilinear resizing to 299). Its weights file is
``weights-inception-2015-12-05-6726825d.pth`` from torch-fidelity's releases; pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` has the same parameter names and the same hash prefix, so either file works.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from difflab.metrics.common import to_uint8, warn_once
from difflab.metrics.feature_metrics import FrechetMetric
from difflab.utils.errors import CheckpointError

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_URL_PYTORCH_FID = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)


class InceptionFeatures(nn.Module):
    """2048-d pool features of the FID Inception for images in [-1, 1] (or uint8), ``B x C x H x W``, C in {1, 3}.

    Images are quantised to uint8 (as saved PNGs would be) and resized to 299 inside the network.
    """

    num_features = 2048
    resize = "uint8 quantisation (round half to even), grey repeated to RGB, TF1-compatible bilinear resize to 299x299"

    def __init__(self, extractor: nn.Module, weights_path: str | os.PathLike | None = None):
        super().__init__()
        self.extractor = extractor
        self.weights_path = weights_path

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"InceptionFeatures expects B x 1|3 x H x W images, got {tuple(x.shape)}")
        x = to_uint8(x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.extractor(x)[0].to(torch.float32)


def load_inception(weights_path: str | os.PathLike | None) -> InceptionFeatures | None:
    """Build the FID Inception from ``weights_path``; None (one warning) when the file or torch-fidelity is missing.

    A file that exists but is not the FID Inception state dict raises ``CheckpointError``.
    """
    path = Path(weights_path) if weights_path else None
    if path is None or not path.is_file():
        warn_once(
            f"inception-missing:{path}",
            f"FID skipped: Inception weights not found at {path}; download {INCEPTION_FILENAME} from "
            f"{INCEPTION_URL_PYTORCH_FID} (or the identical {INCEPTION_URL}) and set metrics.inception_weights=<path>",
        )
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable or unsafe pickle
        raise CheckpointError(
            f"Inception weights {path} cannot be read as a state dict ({err}); re-download them"
        ) from err
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise CheckpointError(
            f"{path} is not the FID Inception state dict (no Mixed_7c.branch_pool.conv.weight); download "
            f"{INCEPTION_FILENAME} from {INCEPTION_URL_PYTORCH_FID}"
        )
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        warn_once(
            "inception-no-torch-fidelity", "FID skipped: torch-fidelity is not installed; pip install torch-fidelity"
        )
        return None
    try:
        extractor = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        )
    except RuntimeError as err:  # load_state_dict mismatch
        raise CheckpointError(f"Inception weights {path} do not fit the FID Inception ({err})") from err
    return InceptionFeatures(extractor, weights_path=path).eval()


def build_fid_metric(weights_path: str | os.PathLike | None, **metric_kwargs) -> FrechetMetric | None:
    """A streaming FID (``FrechetMetric`` on Inception features), or None when the weights are missing."""
    features = load_inception(weights_path)
    if features is None:
        return None
    metric_kwargs.setdefault("feature_name", "inception-v3-2015-12-05-pool3")
    return FrechetMetric(features, **metric_kwargs)
