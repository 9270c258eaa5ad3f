"""Denoising collage: x_t and the predicted x0 along one sampling trajectory, one pair of rows per class / prompt.

Columns are model calls spread evenly along the trajectory (left: pure noise, right: the last step). It shows when
the class identity appears (early: coarse layout, late: detail) and whether x0 predictions at high t are sensible;
a row pair that looks like another class means the label is ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difflab.callbacks.figures import DiagnosticCallback
from difflab.diagnostics.denoise_collage import denoise_collage


class DenoiseCollageCallback(DiagnosticCallback):
    """Denoising collage with EMA weights on the diagnostics schedule (see ``denoise_collage``)."""

    kind = "denoise_collage"

    def __init__(
        self,
        n_columns: int = 8,
        max_rows: int = 10,
        n_uncond: int = 1,
        guidance_scale: float | None = None,
        sampler=None,
        seed: int = 0,
        every_n_steps: int = 1000,
        dense_early: bool = False,
        at_end: bool = True,
    ):
        super().__init__(every_n_steps, dense_early, at_end)
        if n_columns < 2:
            raise ValueError(f"denoise_collage.n_columns must be >= 2; got {n_columns}")
        self.n_columns, self.max_rows, self.n_uncond = int(n_columns), int(max_rows), int(n_uncond)
        self.guidance_scale, self.sampler, self.seed = guidance_scale, sampler, int(seed)

    def draw(self, module, path: Path, context: dict[str, Any]) -> dict[str, float]:
        return denoise_collage(
            module, path, self.n_columns, self.max_rows, self.n_uncond, self.guidance_scale, self.sampler, self.seed
        )
