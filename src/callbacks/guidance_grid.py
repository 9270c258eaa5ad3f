"""Fixed-seed sample grids at several classifier-free guidance scales, side by side (the research log compared
3 / 6 / 9). The same noise is used in every panel, so a column shows one sample as guidance grows: too little looks
like another class, too much is over-saturated or over-stylised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from difflab.callbacks.figures import DiagnosticCallback
from difflab.diagnostics.guidance_grid import guidance_grid


class GuidanceGridCallback(DiagnosticCallback):
    """Guidance-scale comparison with EMA weights on the diagnostics schedule.

    Logs ``guidance/sample_std_s<scale>``: the pixel std of the samples per scale (it grows when high guidance
    over-saturates).
    """

    kind = "guidance_grid"

    def __init__(
        self,
        scales: Sequence[float] = (1.0, 3.0, 6.0, 9.0),
        n_cols: int = 2,
        max_rows: int = 10,
        sampler=None,
        seed: int = 0,
        every_n_steps: int = 1000,
        dense_early: bool = False,
        at_end: bool = True,
    ):
        super().__init__(every_n_steps, dense_early, at_end)
        if not scales:
            raise ValueError("guidance_grid.scales is empty: give at least one guidance scale, e.g. [1, 3, 6, 9]")
        self.scales, self.n_cols, self.max_rows = [float(s) for s in scales], int(n_cols), int(max_rows)
        self.sampler, self.seed = sampler, int(seed)

    def draw(self, module, path: Path, context: dict[str, Any]) -> dict[str, float] | None:
        return guidance_grid(module, path, self.scales, self.n_cols, self.max_rows, self.sampler, self.seed)
