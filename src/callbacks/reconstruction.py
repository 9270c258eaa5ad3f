"""Reconstruction from x_t: noise a fixed batch of real data to a time t and denoise it back with DDIM.

A sweep over several noise levels (default fractions 0.7, 0.5, 0.3, 0.2 of the way from data to noise in the
process's own time) is one figure, one row per level: original | noised x_t | reconstruction. The research log used
it to separate "the denoiser works" (reconstructions look right) from "sampling from pure noise fails" (a schedule /
terminal-SNR problem). Logged scalars: the pixel MSE between original and reconstruction per level
(``recon/mse_t0.70``), and LPIPS per level when an LPIPS backbone is available. The noising, the guided model function
and the sampler (started from the intermediate time) are the library's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from difflab.callbacks.figures import DiagnosticCallback
from difflab.diagnostics.figures import fixed_real_batch
from difflab.diagnostics.reconstruction import check_fraction, reconstruction_sweep
from difflab.metrics.sample_metrics import load_lpips


class ReconstructionCallback(DiagnosticCallback):
    """Reconstruction sweep of a fixed real validation batch, with EMA weights, on the diagnostics schedule.

    Args:
        t_fractions: start levels as fractions of the process's time from data (0) to noise (1), one row each.
        n_images: real images per row.
        steps: DDIM steps of a full trajectory from noise (a start halfway uses about half of them).
        guidance_scale: 1.0 reconstructs with the plain conditional model (no guidance).
        lpips_net / lpips_backbone: LPIPS per t when the backbone weights are available (missing: skipped with one
            warning); ``lpips_net: null`` turns it off.
    """

    kind = "reconstruction"

    def __init__(
        self,
        t_fractions: Sequence[float] = (0.7, 0.5, 0.3, 0.2),
        n_images: int = 6,
        steps: int = 8,
        guidance_scale: float = 1.0,
        seed: int = 0,
        lpips_net: str | None = None,
        lpips_backbone: str | None = None,
        every_n_steps: int = 1000,
        dense_early: bool = True,
        at_end: bool = True,
    ):
        super().__init__(every_n_steps, dense_early, at_end)
        for f in t_fractions:
            check_fraction(f)  # validates the range early
        self.t_fractions, self.n_images, self.steps = list(t_fractions), int(n_images), int(steps)
        self.guidance_scale, self.seed = float(guidance_scale), int(seed)
        self.lpips_net, self.lpips_backbone = lpips_net, lpips_backbone
        self._batch: dict | None = None
        self._lpips = None
        self._lpips_tried = False

    def _lpips_model(self):
        if not self._lpips_tried and self.lpips_net:
            self._lpips = load_lpips(self.lpips_net, self.lpips_backbone)
            self._lpips_tried = True
        return self._lpips

    def draw(self, module, path: Path, context: dict[str, Any]) -> dict[str, float]:
        if self._batch is None:
            self._batch = fixed_real_batch(context.get("datamodule"), self.n_images, split="val")
        return reconstruction_sweep(
            module, self._batch, self.t_fractions, path, self.steps, self.guidance_scale, self.seed, self._lpips_model()
        )
