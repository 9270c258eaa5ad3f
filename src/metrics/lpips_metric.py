"""LPIPS (Zhang et al. 2018) from the ``lpips`` package with the backbone read from a LOCAL torchvision file.

The lpips wheel ships its calibrated linear layers; the alex / vgg / squeeze backbone is torchvision's ImageNet model,
which torchvision would download. Here the backbone comes from ``backbone_weights`` (a torchvision ``state_dict``
file, e.g. ``alexnet-owt-7be5be79.pth``) or from torch hub's cache; missing -> None with one warning.
``pnet_rand=True`` builds a random backbone without any file (tests only: the numbers mean nothing).
"""

from __future__ import annotations

import itertools
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.metrics.common import warn_once
from difflab.utils.errors import CheckpointError

BACKBONE_FILES = {
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "squeeze": ("squeezenet1_1-b8a52dc0.pth", "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
}
LPIPS_MIN_SIDE = 64  # shorter frame side fed to LPIPS; smaller frames are upsampled (see prepare_lpips_frames)


def default_backbone_path(net: str) -> Path:
    """Where torchvision caches the backbone weights (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net][0]


def _new_lpips(net: str, lin_weights: str | os.PathLike | None) -> nn.Module:
    """lpips.LPIPS with a random backbone (no download); silences torchvision's 'pretrained' deprecation noise."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(
            net=net, pnet_rand=True, verbose=False, model_path=str(lin_weights) if lin_weights else None
        )
    return model


def _load_backbone(model: nn.Module, path: Path) -> None:
    """Copy a torchvision ``features.<i>.*`` state dict into lpips' ``slice<k>.<i>.*`` backbone modules."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable or unsafe pickle
        raise CheckpointError(f"LPIPS backbone weights {path} cannot be read as a state dict ({err})") from err
    mapped, missing = {}, []
    for name in model.net.state_dict():
        _, index, param = name.split(".", 2)  # slice<k>.<i>.<param>
        src = f"features.{index}.{param}"
        if src in state:
            mapped[name] = state[src]
        else:
            missing.append(src)
    if missing:
        raise CheckpointError(
            f"{path} is not a torchvision {model.pnet_type} state dict (missing {missing[:3]}); download "
            f"{BACKBONE_FILES[model.pnet_type][1]}"
        )
    model.net.load_state_dict(mapped)


def build_lpips(
    net: str = "alex",
    backbone_weights: str | os.PathLike | None = None,
    pnet_rand: bool = False,
    lin_weights: str | os.PathLike | None = None,
) -> nn.Module | None:
    """An eval-mode, gradient-free ``lpips.LPIPS``; None (with one warning) when the backbone file is missing.

    ``backbone_weights`` defaults to torch hub's cache path for ``net``; ``lin_weights`` overrides the linear layers
    shipped in the wheel.
    """
    if net not in BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
    if pnet_rand:
        model = _new_lpips(net, lin_weights)
    else:
        path = Path(backbone_weights) if backbone_weights else default_backbone_path(net)
        if not path.is_file():
            filename, url = BACKBONE_FILES[net]
            warn_once(
                f"lpips-missing:{path}",
                f"LPIPS skipped: {net} backbone weights not found at {path}; download {filename} from {url} and set "
                "metrics.lpips_backbone=<path>",
            )
            return None
        model = _new_lpips(net, lin_weights)
        _load_backbone(model, path)
    return model.eval().requires_grad_(False)


def prepare_lpips_frames(x: Tensor) -> Tensor:
    """Images ``B x C x H x W`` or videos ``B x C x T x H x W`` (C = 1 or 3, float in [-1, 1]) -> the 3-channel frames
    ``(B*T) x 3 x H' x W'`` that every LPIPS caller (metric, loss terms, callbacks) feeds to ``lpips.LPIPS``.

    Frames are cast to float32 (the dtype of the LPIPS weights) and grey ones repeated to 3 channels. Frames whose
    shorter side is below ``LPIPS_MIN_SIDE`` are upsampled (bilinear, aspect kept, so values stay within the input's
    range; gradients flow through); larger frames keep their size and values. Why 64: the backbones fail outright
    below 31 px (alex), 17 px (squeeze) and 16 px (vgg), and at 32 px alexnet's conv3-conv5 see a single 1 x 1
    position; LPIPS's linear layers were calibrated on 64 x 64 patches (BAPPS), where every layer keeps a 3 x 3 map.
    """
    shape = tuple(x.shape)
    if x.dim() == 5:
        x = x.transpose(1, 2).flatten(0, 1)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"LPIPS compares pixel frames (B x 1|3 x H x W images or B x 1|3 x T x H x W videos), "
            f"got shape {shape}: latents or other channel counts cannot be compared"
        )
    if not x.is_floating_point():
        raise TypeError(f"LPIPS frames must be float pixels in [-1, 1], got dtype {x.dtype}")
    x = x.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if min(h, w) < LPIPS_MIN_SIDE:
        scale = LPIPS_MIN_SIDE / min(h, w)
        size = (max(LPIPS_MIN_SIDE, round(h * scale)), max(LPIPS_MIN_SIDE, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def lpips_distance(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 64) -> Tensor:
    """LPIPS between paired samples in [-1, 1] (reconstruction quality); one value per sample (videos: frame mean).

    Frames go through ``prepare_lpips_frames`` (grey -> RGB, small frames upsampled).
    """
    if x.shape != y.shape:
        raise ValueError(f"LPIPS pairs need equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    n = x.shape[0]
    fx, fy = prepare_lpips_frames(x), prepare_lpips_frames(y)
    model.to(x.device)
    out = torch.cat(
        [model(fx[i : i + batch_size], fy[i : i + batch_size]).flatten() for i in range(0, fx.shape[0], batch_size)]
    )
    return out.view(n, -1).mean(dim=1)


@torch.no_grad()
def lpips_diversity(
    model: nn.Module,
    samples: Tensor,
    max_pairs: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> Tensor:
    """Mean pairwise LPIPS among samples (higher = more diverse): all pairs i < j, or ``max_pairs`` random ones."""
    n = samples.shape[0]
    if n < 2:
        raise ValueError(f"LPIPS diversity needs at least 2 samples, got {n}")
    pairs = torch.tensor(list(itertools.combinations(range(n), 2)))
    if max_pairs is not None and max_pairs < len(pairs):
        pairs = pairs[torch.randperm(len(pairs), generator=generator)[:max_pairs]]
    pairs = pairs.to(samples.device)
    values = [
        lpips_distance(model, samples[chunk[:, 0]], samples[chunk[:, 1]], batch_size)
        for chunk in pairs.split(batch_size)
    ]
    return torch.cat(values).mean()
