"""Send figures and scalars to every active Lightning logger (TensorBoard, W&B, CSV); route Lightning's own log lines."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from difflab.trust import not_a_link

log = logging.getLogger(__name__)


def print_lightning_lines_once() -> None:
    """Each Lightning message once, in the run's log format and its log file.

    ``import lightning`` gives the ``lightning`` logger a console handler of its own ("INFO: ..."); imported after
    Hydra has configured the root logger (the entry points import Lightning lazily, to keep ``--help`` fast), its
    records would also reach the root handlers and every line would be printed twice. When the root logger has
    handlers, Lightning's console handler is removed and the root's (console + ``<task>.log``) print the record.
    """
    import lightning  # noqa: F401  (adds the handler on first import)

    if not logging.getLogger().hasHandlers():
        return
    package = logging.getLogger("lightning")
    for handler in list(package.handlers):
        if type(handler) is logging.StreamHandler:
            package.removeHandler(handler)


def log_image(trainer, key: str, path: str | Path, step: int, caption: str | None = None) -> None:
    """Log a PNG already written at ``path`` to each logger that can show images; CSV gets the path as text."""
    from PIL import Image

    arr = None
    for logger in trainer.loggers:
        name = type(logger).__name__
        try:
            if name == "TensorBoardLogger":
                arr = arr if arr is not None else np.asarray(Image.open(path).convert("RGB"))
                logger.experiment.add_image(key, arr, global_step=step, dataformats="HWC")
            elif name == "WandbLogger":
                logger.log_image(key=key, images=[str(path)], step=step, caption=[caption] if caption else None)
            elif name == "CSVLogger":
                append_figure_index(Path(logger.log_dir), key, step, path)
        except Exception as err:  # a logger failing must not stop training
            log.warning("could not log image %s to %s: %s", key, name, err)


def append_figure_index(log_dir: Path, key: str, step: int, path: str | Path) -> None:
    """Append a row (step, key, path) to the CSV logger's figures.csv index."""
    log_dir.mkdir(parents=True, exist_ok=True)
    index = log_dir / "figures.csv"

    new = not index.exists()
    with open(not_a_link(index), "a") as f:
        if new:
            f.write("step,key,path\n")
        f.write(f"{step},{key},{path}\n")


def figure_path(run_dir: str | Path, kind: str, step: int, suffix: str = ".png") -> Path:
    """<run>/figures/<kind>/step_XXXXXXX.png"""
    return Path(run_dir) / "figures" / kind / f"step_{step:07d}{suffix}"
