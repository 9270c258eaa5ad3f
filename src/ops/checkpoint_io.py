"""Lightning ``CheckpointIO`` that writes checkpoints atomically and only ever reads them with ``weights_only=True``.

Lightning's own ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in the system
temp directory; on another filesystem the final "move" is a copy, so a kill during it can truncate ``last.ckpt``.
Here the temporary file sits next to the target and is renamed over it (see ``difflab.ops.atomic``); a full disk
raises ``DiskFullError`` (one line naming the file, the previous one intact, no temporary left), which ends the fit.
Wire it with ``trainer.plugins: [{_target_: difflab.ops.checkpoint_io.AtomicCheckpointIO}]`` (the default trainer does).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from difflab.checkpoints import load_checkpoint as load_safely  # one place for safe loading and its messages
from difflab.ops.atomic import atomic_torch_save

log = logging.getLogger(__name__)


def _is_local(path: _PATH) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic local saves (temp file + fsync + rename); every load is ``weights_only=True`` with one-line errors."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        if not _is_local(path):  # remote object stores: uploads are all-or-nothing already
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))
        log.debug("saved checkpoint %s", path)

    def load_checkpoint(
        self, path: _PATH, map_location: Optional[Callable] = None, weights_only: Optional[bool] = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(
                f"refusing to load {path} with weights_only=False: difflab only loads checkpoints as "
                f"tensors and plain containers"
            )
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_safely(str(path).removeprefix("file://"), map_location=map_location or "cpu")
