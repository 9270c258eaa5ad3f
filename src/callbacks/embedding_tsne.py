"""t-SNE (scikit-learn) of the condition embeddings as a labelled scatter plot.

Class models: the rows of ``conditioner.embedding.weight`` (every class plus the null class). Text models: the vector
the denoiser receives for each of the model's prompts (the trainable projection of the pooled text embedding, or
the pooled embedding itself when there is no projection), plus the empty prompt. Points that stay in one clump mean
the conditioning carries no information (the research log's "labels were ignored"). Scalar:
``embeddings/mean_cosine``, the mean pairwise cosine similarity of the (non-null) embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difflab.callbacks.figures import DiagnosticCallback
from difflab.diagnostics.embedding_tsne import embedding_tsne


class EmbeddingTSNECallback(DiagnosticCallback):
    """t-SNE of the EMA module's condition embeddings on the diagnostics schedule."""

    kind = "embedding_tsne"

    def __init__(
        self,
        seed: int = 0,
        max_prompts: int = 200,
        every_n_steps: int = 1000,
        dense_early: bool = True,
        at_end: bool = True,
    ):
        super().__init__(every_n_steps, dense_early, at_end)
        self.seed, self.max_prompts = int(seed), int(max_prompts)

    def draw(self, module, path: Path, context: dict[str, Any]) -> dict[str, float] | None:
        return embedding_tsne(module, path, self.seed, self.max_prompts)
