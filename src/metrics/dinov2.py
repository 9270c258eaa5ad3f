"""Frechet distance in DINOv2 features (FD_DINOv2), built from a LOCAL Hugging Face model folder (no download at run
time).

Stein et al. 2023, "Exposing flaws of generative model evaluation metrics and their unfair treatment of diffusion
models" (NeurIPS), propose DINOv2 ViT-L/14 as the feature network instead of Inception; their reference code is
https://github.com/layer6ai-labs/dgm-eval (read at commit 74c79f7). The facts this module relies on, in our words:

* Encoder: ``--model dinov2`` with no ``--arch`` gives ViT-L/14 (dgm_eval/models/dinov2.py L32-34, __main__.py
  L323), loaded with ``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')`` (dinov2.py L43). The feature is
  what that model's ``forward`` returns: ``head(x_norm_clstoken)`` with ``head = nn.Identity()`` and
  ``x_norm_clstoken = norm(tokens)[:, 0]``, i.e. the CLS token after the final LayerNorm, 1024-d for ViT-L/14
  (facebookresearch/dinov2 dinov2/models/vision_transformer.py L167, L264-266, L325-330). Features are not
  L2-normalised for FD (representations.py L62-63 with ``normalized=False`` from __main__.py L142).
* Input: images are read with PIL and ``.convert('RGB')`` (dataloaders.py L44 and L63), so grey images become three
  equal channels and resizing happens on 8-bit images.
* Preprocessing (dinov2.py L46-59, default ``clean_resize=False``, __main__.py L84-85): torchvision
  ``Resize((224, 224), BICUBIC)`` on the PIL image -- a square 224x224 resize that ignores the aspect ratio, NO
  centre crop -- then ``ToTensor`` (/255) and ``Normalize`` with the ImageNet mean (0.485, 0.456, 0.406) and std
  (0.229, 0.224, 0.225). On a PIL image that Resize is ``PIL.Image.resize(..., BICUBIC)``
  (torchvision/transforms/_functional_pil.py ``resize``): a separable, antialiased (support widened by the
  downscale factor) cubic filter with a = -0.5, horizontal pass first with the intermediate image rounded and
  clipped to 8 bits (Pillow src/libImaging/Resample.c ``ImagingResampleInner``).
* Positional embeddings: the hub models are built with ``interpolate_offset=0.1`` and
  ``interpolate_antialias=False`` (dinov2/hub/backbones.py L27-28); their 37x37 (518 / 14) grid is resized to the
  input's 16x16 grid by bicubic ``F.interpolate`` with ``scale_factor = (16 + 0.1) / 37`` per axis
  (vision_transformer.py L180-211). Hugging Face's ``Dinov2Embeddings.interpolate_pos_encoding`` passes
  ``size=(16, 16)`` instead (transformers models/dinov2/modeling_dinov2.py L87-122 in the pinned version), which
  samples the grid at slightly different points (huggingface/transformers PR #35411 notes the hidden states are not
  equivalent).
* Hugging Face ``Dinov2Model``: ``last_hidden_state = layernorm(encoder output)`` and ``pooler_output =
  last_hidden_state[:, 0]`` (modeling_dinov2.py L415-419), i.e. exactly ``x_norm_clstoken``.

What this module does with them: pixels in [-1, 1] are quantised to uint8 exactly as saved PNGs would be
(``difflab.metrics.common.to_uint8``, as the Inception path does), grey is repeated to RGB, the image is resized
to 224x224 with the PIL filter reproduced in torch (``F.interpolate(mode="bicubic", antialias=True)`` uses the same
a = -0.5 antialiased kernel; we run it one axis at a time, horizontal first, rounding and clipping to 8 bits after
each pass), scaled to [0, 1], ImageNet-normalised, and fed to the model; the feature is ``pooler_output``. On CPU
this agrees with PIL to within 2/255 on under 1% of pixels (tests/test_dinov2.py); it is the same float computation
on every device, whereas torchvision's tensor ``resize`` of uint8 uses a native 8-bit kernel on CPU but a one-pass
float path on CUDA, which skips the intermediate 8-bit clipping (up to ~25/255 off on high-contrast images).
By default (``hub_pos_embed=True``) the model's positional embeddings are resampled once at load time to the
16x16 grid with the hub's offset rule, as dgm-eval's torch.hub model resamples them at every call;
``hub_pos_embed=False`` keeps Hugging Face's own interpolation (and adds ``-hfpos`` to ``feature_name``).

Not reproduced: Pillow >= 13 runs the vertical pass first when the height shrinks much more than the width
(Pillow PR #9549), so for such non-square inputs PIL 13 and this module differ slightly; square images, the usual
case, are unaffected. dgm-eval's optional ``--clean_resize`` (float, per-channel PIL resize) is not offered.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.metrics.common import to_uint8
from difflab.metrics.feature_metrics import FrechetMetric
from difflab.utils.errors import CorruptDataError, DataNotFoundError

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_INTERPOLATE_OFFSET = 0.1
DINOV2_REPO_ID = "facebook/dinov2-large"
RESIZE_DESCRIPTION = (
    f"uint8 quantise, PIL-style bicubic (antialiased, a=-0.5, horizontal then vertical, 8-bit rounding) resize to "
    f"{INPUT_SIZE}x{INPUT_SIZE} without crop, ImageNet mean/std"
)
# (hidden_size, num_hidden_layers) -> the arch letter of the official DINOv2 backbones (ViT-S/B/L/g).
_ARCH_LETTERS = {(384, 12): "s", (768, 12): "b", (1024, 24): "l", (1536, 40): "g"}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _how_to_get(path: Path) -> str:
    return (
        f"on a machine with internet run `hf download {DINOV2_REPO_ID} --local-dir {path}` (older huggingface_hub: "
        f"`huggingface-cli download ...`) and copy that folder here"
    )


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def _check_folder(path: Path) -> dict:
    """The folder's parsed config.json, after checking that it is a readable DINOv2 Hugging Face model folder."""
    if not path.exists():
        raise DataNotFoundError(f"DINOv2 weights not found: {path} does not exist; {_how_to_get(path)}")
    if not path.is_dir():
        raise DataNotFoundError(
            f"DINOv2 weights must be a Hugging Face model folder (config.json + model.safetensors), but {path} is "
            f"not a directory; {_how_to_get(path)}"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DataNotFoundError(f"DINOv2 weights folder {path} has no config.json; {_how_to_get(path)}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptDataError(
            f"DINOv2 config {config_file} cannot be read ({_one_line(err)}); re-download {DINOV2_REPO_ID}"
        ) from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "dinov2":
        raise CorruptDataError(
            f"{config_file} describes a {model_type!r} model, not DINOv2 (model_type 'dinov2', no registers); point "
            f"the DINOv2 weights at a download of {DINOV2_REPO_ID}"
        )
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise DataNotFoundError(
            f"DINOv2 weights folder {path} has a config.json but no model.safetensors; {_how_to_get(path)}"
        )
    return config


def hub_resampled_pos_embed(pos_embed: Tensor, grid: int, offset: float = HUB_INTERPOLATE_OFFSET) -> Tensor:
    """``1 x (1 + M*M) x D`` positional embeddings (CLS first) resized to a ``grid x grid`` patch grid the way the
    official DINOv2 torch.hub models do (bicubic, no antialias, ``scale_factor = (grid + offset) / M``); returned
    unchanged when ``M == grid``."""
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"positional embeddings of {n} patches do not form a square grid")
    if m == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = float(grid + offset) / m
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if patches.shape[-2:] != (grid, grid):  # cannot happen for offset in [0, 1); guards a caller's odd offset
        raise ValueError(f"hub interpolation gave a {tuple(patches.shape[-2:])} grid, expected {grid}x{grid}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat((pos_embed[:, :1].float(), patches), dim=1).to(pos_embed.dtype)


def pil_bicubic_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize uint8-valued ``B x C x H x W`` images to ``size`` (H, W) like ``PIL.Image.resize(BICUBIC)``.

    Antialiased bicubic (a = -0.5) along the width, rounded and clipped to [0, 255], then along the height, rounded
    and clipped again. Returns float32 holding integers in [0, 255]; an axis already at its size is left untouched.
    """
    out = x.to(torch.float32)
    h, w = out.shape[-2:]
    if w != size[1]:
        out = F.interpolate(out, size=(h, size[1]), mode="bicubic", antialias=True, align_corners=False)
        out = out.clamp_(0, 255).round_()
    if h != size[0]:
        out = F.interpolate(out, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
        out = out.clamp_(0, 255).round_()
    return out


def dinov2_feature_name(config, hub_pos_embed: bool = True) -> str:
    """A short cache-key name for the features of a DINOv2 config: ``dinov2-vitl14-1024`` for ViT-L/14; a
    non-standard size reads ``dinov2-vit14-2layer-32`` (patch, depth, width); ``-hfpos`` marks HF pos. interpolation."""
    hidden = int(config.hidden_size)
    layers = int(config.num_hidden_layers)
    patch = int(config.patch_size)
    letter = _ARCH_LETTERS.get((hidden, layers))
    name = f"dinov2-vit{letter}{patch}-{hidden}" if letter else f"dinov2-vit{patch}-{layers}layer-{hidden}"
    return name if hub_pos_embed else f"{name}-hfpos"


def _load_model(path: Path) -> nn.Module:
    from transformers import Dinov2Model
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # No dtype argument (``torch_dtype`` before transformers 4.56, ``dtype`` after): cast to float32 below.
        model, info = Dinov2Model.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - unreadable / truncated / mismatched weight files
        raise CorruptDataError(
            f"DINOv2 weights in {path} cannot be loaded ({_one_line(err)}); re-download {DINOV2_REPO_ID}"
        ) from err
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    bad = sorted(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if bad:
        raise CorruptDataError(
            f"DINOv2 weights in {path} do not fit their config ({len(bad)} missing or mismatched tensors, e.g. "
            f"{bad[0]}); re-download {DINOV2_REPO_ID}"
        )
    return model.float()


class DinoV2Features(nn.Module):
    """DINOv2 CLS features (final LayerNorm) for images in [-1, 1] (or uint8), ``B x C x H x W`` with C in {1, 3}.

    Args:
        weights: a local Hugging Face model folder (config.json + model.safetensors), e.g. from
            ``hf download facebook/dinov2-large --local-dir <path>`` or ``Dinov2Model.save_pretrained``.
        hub_pos_embed: resample the positional embeddings like dgm-eval's torch.hub model (default); False keeps
            Hugging Face's interpolation (slightly different features, ``-hfpos`` in ``feature_name``).

    Attributes: ``num_features`` (hidden size, 1024 for ViT-L/14), ``feature_name`` (``dinov2-vitl14-1024``),
    ``resize`` (one line describing the preprocessing), ``weights_path`` (the folder), ``model`` (the
    ``Dinov2Model``, eval mode, no grad). ``forward`` returns ``B x num_features`` float32, autocast off.
    """

    def __init__(self, weights: str | os.PathLike, *, hub_pos_embed: bool = True):
        super().__init__()
        path = Path(weights).expanduser()
        _check_folder(path)
        model = _load_model(path)
        config = model.config
        if int(config.num_channels) != 3:
            raise CorruptDataError(f"DINOv2 config in {path} expects {config.num_channels} input channels, not 3")
        self.hub_pos_embed = bool(hub_pos_embed)
        if self.hub_pos_embed:
            grid = INPUT_SIZE // int(config.patch_size)
            emb = model.embeddings
            with torch.no_grad():
                new = hub_resampled_pos_embed(emb.position_embeddings.data, grid)
            # Stored at the input's grid, so Hugging Face's own interpolation is skipped (sizes already match).
            emb.position_embeddings = nn.Parameter(new, requires_grad=False)
            config.image_size = grid * int(config.patch_size)
        model.eval().requires_grad_(False)
        self.model = model
        self.weights_path = path
        self.num_features = int(config.hidden_size)
        self.feature_name = dinov2_feature_name(config, self.hub_pos_embed)
        self.resize = RESIZE_DESCRIPTION
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> "DinoV2Features":  # a frozen feature network stays in eval mode
        return super().train(False)

    def preprocess(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] (or uint8), C in {1, 3} -> ``B x 3 x 224 x 224`` float32 model input."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"DinoV2Features expects B x 1|3 x H x W images, got {tuple(x.shape)}")
        x = to_uint8(x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = pil_bicubic_resize(x, (INPUT_SIZE, INPUT_SIZE)) / 255.0
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            pixels = self.preprocess(x)
            out = self.model(pixel_values=pixels)
        return out.pooler_output.to(torch.float32)


def build_dinov2_metric(weights: str | os.PathLike, **metric_kwargs) -> FrechetMetric:
    """A streaming FD_DINOv2 (``FrechetMetric`` on ``DinoV2Features(weights)``); missing weights raise
    ``DataNotFoundError``. ``hub_pos_embed`` goes to ``DinoV2Features``, everything else to ``FrechetMetric``."""
    features = DinoV2Features(weights, hub_pos_embed=metric_kwargs.pop("hub_pos_embed", True))
    metric_kwargs.setdefault("feature_name", features.feature_name)
    return FrechetMetric(features, **metric_kwargs)
