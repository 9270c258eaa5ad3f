"""Objects the trust-gate tests name from stored files: a benign denoiser from outside difflab (what a researcher's own
package holds) and a pickle payload that leaves a marker when it is unpickled."""

from __future__ import annotations

import os

from difflab.models.unet2d import UNet2D


class OwnDenoiser(UNet2D):
    """A researcher's denoiser in their own package: the same network under another module name."""


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: a marker directory that must never appear."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)
