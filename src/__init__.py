"""difflab: a Lightning + Hydra framework for training and evaluating diffusion models.

Importing the package is cheap (no torch, no Lightning); the pieces live in its subpackages: ``difflab.diffusion``
(the math), ``difflab.models``, ``difflab.lit_modules``, ``difflab.datamodules``, ``difflab.callbacks``, and the
entry points ``difflab.train``, ``difflab.sample``, ``difflab.export``, ``difflab.report``,
``difflab.encode_latents`` (console commands ``difflab-train``, ...).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("difflab")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
