"""CLIP score (Hessel et al. 2021, as torchmetrics' CLIPScore): 100 x cosine(image embedding, text embedding).

The CLIP model and processor load with transformers from a local directory or a hub name (hub names need the
files in the local HF cache when offline). If they cannot be loaded the metric is skipped with one warning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from difflab.metrics.common import to_uint8, warn_once
from difflab.utils.frozen import Frozen


class ClipScorer:
    """Per-pair CLIP scores for images in [-1, 1] (``B x C x H x W``; videos ``B x C x T x H x W`` average frames).

    The model is held frozen (outside any state_dict) and moved to the images' device on first use.
    """

    def __init__(self, model: Any, processor: Any):
        self.model = Frozen(model)
        self.processor = processor
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def scores(self, images: Tensor, texts: list[str]) -> Tensor:
        """100 * cos(E_image, E_text) for each (image, text) pair, not clamped; float32 tensor ``B``."""
        if len(texts) != images.shape[0]:
            raise ValueError(f"CLIP score needs one text per sample: got {len(texts)} texts for {images.shape[0]}")
        if images.dim() == 5:  # videos: score every frame against its caption, average over frames
            b, t = images.shape[0], images.shape[2]
            frames = images.transpose(1, 2).flatten(0, 1)
            per_frame = self.scores(frames, [s for s in texts for _ in range(t)])
            return per_frame.view(b, t).mean(dim=1)
        img, txt = self._embeddings(images, texts)
        return (100 * (img * txt).sum(dim=-1)).float().to(images.device)

    @torch.no_grad()
    def similarity_matrix(self, images: Tensor, texts: list[str]) -> Tensor:
        """100 * cos(E_image_i, E_text_k) for every image and every text: ``B x K`` (zero-shot classification)."""
        img, txt = self._embeddings(images, texts)
        return (100 * img @ txt.T).float().to(images.device)

    def _embeddings(self, images: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Unit-norm CLIP embeddings of the images (``B x D``) and of the texts (``K x D``)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"CLIP score expects B x 1|3 x H x W images, got {tuple(images.shape)}")
        pixels = to_uint8(images).expand(-1, 3, -1, -1).cpu()
        inputs = self.processor(
            text=list(texts),
            images=list(pixels),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        )
        if self.model.device != images.device:
            self.model.to(images.device)
        device = images.device
        out = self.model(**{k: v.to(device) for k, v in inputs.items()})
        img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        return img, txt


def load_clip_scorer(name_or_path: str | os.PathLike | None, local_files_only: bool = False) -> ClipScorer | None:
    """Load CLIPModel + CLIPProcessor; None (with one warning) when they cannot be loaded."""
    from transformers import CLIPModel, CLIPProcessor

    name = os.path.expanduser(str(name_or_path)) if name_or_path else ""
    hint = (
        "download a CLIP model (e.g. `huggingface-cli download openai/clip-vit-base-patch32 --local-dir <dir>`) and "
        "set metrics.clip_model=<dir>"
    )
    if not name or (name.startswith((".", "/")) and not Path(name).exists()):
        warn_once(f"clip-missing:{name}", f"CLIP score skipped: no CLIP model at {name or None}; {hint}")
        return None
    try:
        model = CLIPModel.from_pretrained(name, local_files_only=local_files_only)
        processor = CLIPProcessor.from_pretrained(name, local_files_only=local_files_only)
    except Exception as err:  # noqa: BLE001 - any loading failure means: skip the metric
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warn_once(f"clip-missing:{name}", f"CLIP score skipped: cannot load CLIP from {name} ({first}); {hint}")
        return None
    return ClipScorer(model, processor)


class ClipScoreMetric(Metric):
    """Streaming, DDP-synced mean CLIP score, clamped at 0 as torchmetrics' CLIPScore: max(mean(100 cos), 0)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, scorer: ClipScorer, **kwargs: Any):
        super().__init__(**kwargs)
        self.scorer = scorer
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, texts: list[str]) -> None:  # type: ignore[override]
        """Add a batch of samples and their prompts."""
        s = self.scorer.scores(images, texts).to(self.score_sum.device, torch.float64)
        self.score_sum += s.sum()
        self.count += s.numel()

    def compute(self) -> Tensor:
        """Mean CLIP score over everything seen, clamped at 0."""
        if int(self.count) == 0:
            raise RuntimeError("ClipScoreMetric.compute called before any update")
        return (self.score_sum / self.count).clamp(min=0)
