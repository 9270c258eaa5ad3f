"""Shared pieces of the diagnostic callbacks: their schedule / EMA / logging base class, labelled image mosaics
(PIL), matplotlib figure writing, fixed real batches and scalar logging.

Every diagnostic draws from a module alone (a plain function per figure), so the callbacks (during training, EMA
weights) and ``report.py`` (from a checkpoint) produce the same pictures.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from difflab.ops.ema_weights import ema_module, prepare_ema_weights
from difflab.callbacks.schedule import is_scheduled
from difflab.ops.atomic import atomic_write
from difflab.utils.images import make_grid, to_uint8
from difflab.utils.logging import figure_path, log_image

log = logging.getLogger(__name__)

PAD = 1  # pixels between cells in every mosaic


# ------------------------------------------------------------------------------------------------ logging
@rank_zero_only
def log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send scalars to every active logger at ``step`` (rank 0 only); non-finite values are logged as they are."""
    if not metrics:
        return
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        try:
            logger.log_metrics(clean, step=step)
        except Exception as err:  # a logger failing must not stop training
            log.warning("could not log %s to %s: %s", sorted(clean), type(logger).__name__, err)


def publish_metrics(trainer: L.Trainer, pl_module: L.LightningModule, scalars: dict[str, float] | None,
                    published: dict[str, float], in_loop: bool) -> None:
    """Make a callback's scalars visible to Lightning: ``trainer.callback_metrics`` (so that
    ``ModelCheckpoint(monitor=...)``, ``EarlyStopping`` and the sweeper's ``optimized_metric`` can use sample metrics),
    and remember them in ``published`` (read by the training pipeline after ``fit``).

    Inside the training loop they go through ``LightningModule.log`` (logger=False: the loggers already got them
    at their exact step from ``log_scalars``); every rank holds the same values (computed on all ranks or broadcast
    from rank 0), so DDP ranks agree on what ``ModelCheckpoint`` monitors. After the loop (``on_train_end``)
    Lightning allows no ``log`` call: the values are kept in ``published`` only.
    """
    if not scalars:
        return
    values = {k: float(v) for k, v in scalars.items()}
    published.update(values)
    if in_loop:
        for name, value in values.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, logger=False, prog_bar=False, batch_size=1)


# ------------------------------------------------------------------------------------------------ base callback
class DiagnosticCallback(L.Callback):
    """Calls ``draw(module, path, context) -> scalars`` on the dense-early schedule and at the end of training, then
    logs the figure at ``path`` (``<run>/figures/<kind>/step_XXXXXXX.png``) and the scalars to every logger.

    Subclasses set ``kind`` (figure folder and logger key) and implement ``draw``; ``module`` is the EMA-weighted
    module; ``draw`` returns None when it has nothing to show. Figures are drawn on rank 0 only unless ``all_ranks``
    is True (diagnostics that shard work across DDP ranks).
    """

    kind = "diagnostic"
    all_ranks = False
    samples_ema_weights = True  # difflab.ops.ema_weights: draws from the EMA weights

    def __init__(self, every_n_steps: int = 1000, dense_early: bool = True, at_end: bool = True):
        if every_n_steps < 0:
            raise ValueError(f"{type(self).__name__}: every_n_steps must be >= 0 (0: only dense-early / at end); "
                             f"got {every_n_steps}")
        self.every_n_steps, self.dense_early, self.at_end = int(every_n_steps), bool(dense_early), bool(at_end)
        self.written: list[Path] = []
        self.published: dict[str, float] = {}   # the latest scalars, as put into trainer.callback_metrics
        self._last_step = -1

    # hooks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or step == self._last_step:
            return
        if is_scheduled(step, self.every_n_steps, self.dense_early):
            self._last_step = step
            publish_metrics(trainer, pl_module, self._run(trainer, pl_module, step), self.published, in_loop=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and self._last_step != trainer.global_step:
            self._last_step = trainer.global_step
            publish_metrics(trainer, pl_module, self._run(trainer, pl_module, trainer.global_step), self.published,
                            in_loop=False)

    def _run(self, trainer, pl_module, step: int) -> dict[str, float] | None:
        """Draw (on rank 0, or on every rank when ``all_ranks``), log figure and scalars from rank 0, and return
        rank 0's scalars on every rank (for ``trainer.callback_metrics``)."""
        scalars = None
        prepare_ema_weights(trainer, pl_module)  # every rank: under FSDP they gather the EMA weights together
        if self.all_ranks or trainer.global_rank == 0:
            module = ema_module(trainer, pl_module)
            path = figure_path(trainer.default_root_dir, self.kind, step)
            context = {"trainer": trainer, "datamodule": getattr(trainer, "datamodule", None), "step": step}
            scalars = self.draw(module, path, context)
            if trainer.global_rank == 0 and scalars is not None:
                if path.is_file():
                    self.written.append(path)
                    log_image(trainer, f"diagnostics/{self.kind}", path, step, caption=f"{self.kind}, step {step}")
                log_scalars(trainer, scalars, step)
        if trainer.world_size > 1:
            scalars = trainer.strategy.broadcast(scalars, src=0)
        return scalars

    def draw(self, module, path: Path, context: dict[str, Any]) -> dict[str, float] | None:
        """Write the figure at ``path`` (if any) and return scalars to log."""
        raise NotImplementedError

    def report(self, module, out_dir: Path, context: dict[str, Any]) -> dict[str, float]:
        """The same diagnostic for ``report.py``: writes ``<out_dir>/<kind>.png``; returns its scalars."""
        return self.draw(module, Path(out_dir) / f"{self.kind}.png", context) or {}


# ------------------------------------------------------------------------------------------------ images
def stills(x: torch.Tensor) -> torch.Tensor:
    """Images as they are; videos ``B x C x T x H x W`` -> their middle frame (for still figures)."""
    return x[:, :, x.shape[2] // 2] if x.ndim == 5 else x


def column_block(images: torch.Tensor, ncol: int = 1) -> np.ndarray:
    """[-1, 1] images ``N x C x H x W`` -> an H' x W' x 3 uint8 grid with ``ncol`` images per row."""
    u8 = to_uint8(stills(images))
    if u8.shape[1] == 1:
        u8 = u8.expand(-1, 3, -1, -1)
    return make_grid(u8, nrow=ncol, pad=PAD, pad_value=255)


def _new_figure(width_px: float, height_px: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(width_px, 200) / dpi, max(height_px, 120) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib Figure as PNG atomically (no pyplot, so no global backend state); returns the path."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def labelled_mosaic(blocks: Sequence[np.ndarray], block_titles: Sequence[str], row_labels: Sequence[str],
                    path: str | Path, title: str | None = None, cell_px: int = 48) -> Path:
    """Image blocks of equal height side by side, each titled, with a label per row of cells on the left.

    Blocks come from ``column_block`` (square cells, ``PAD`` apart); cells are enlarged (nearest neighbour) to about
    ``cell_px`` so tiny 8x8 or 16x16 samples stay readable. Drawn with PIL (a few ms; matplotlib takes ~0.5 s).
    """
    from PIL import Image, ImageDraw

    heights = {b.shape[0] for b in blocks}
    if len(heights) != 1:
        raise ValueError(f"labelled_mosaic: blocks must have equal heights, got {sorted(heights)}")
    n_rows = max(1, len(row_labels))
    cell = (blocks[0].shape[0] - PAD) / n_rows - PAD
    scale = max(1, round(cell_px / max(cell, 1.0)))
    big = [b.repeat(scale, axis=0).repeat(scale, axis=1) for b in blocks]
    f_title, f_text = _font(15), _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(text: str, font) -> int:
        box = probe.textbbox((0, 0), text, font=font)
        return box[2] - box[0]

    gap, margin = 16, 8
    label_w = max((text_w(t, f_text) for t in row_labels), default=0) + (12 if row_labels else 0)
    slots = [max(b.shape[1], text_w(t, f_text) + 8) for b, t in zip(big, block_titles)]
    top = margin + (24 if title else 0) + 20
    width = max(margin + label_w + sum(slots) + gap * (len(big) - 1) + margin,
                text_w(title, f_title) + 2 * margin if title else 0)
    height = top + big[0].shape[0] + margin
    canvas = Image.new("RGB", (int(width), int(height)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((width / 2, margin), title, fill="black", font=f_title, anchor="ma")
    x = margin + label_w
    for b, slot, head in zip(big, slots, block_titles):
        left = x + (slot - b.shape[1]) // 2
        canvas.paste(Image.fromarray(b), (int(left), top))
        draw.text((x + slot / 2, top - 4), head, fill="black", font=f_text, anchor="md")
        x += slot + gap
    step = (cell + PAD) * scale
    for r, label in enumerate(row_labels):
        y = top + PAD * scale + r * step + cell * scale / 2
        draw.text((margin + label_w - 8, y), label, fill="black", font=f_text, anchor="rm")
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def captioned_grid(images: torch.Tensor, n_cols: int, captions: Sequence[str], colours: Sequence[str],
                   row_labels: Sequence[str], path: str | Path, title: str | None = None, cell_px: int = 64) -> Path:
    """A grid of [-1, 1] images with a short caption under every cell (its own colour) and a label per row.

    Used by the scored class grid: each cell says what a judge saw in it (``7 p.98`` in green when it is the
    requested class, red when not). Cells are enlarged (nearest neighbour) to about ``cell_px``."""
    from PIL import Image, ImageDraw

    u8 = to_uint8(stills(images))
    if u8.shape[1] == 1:
        u8 = u8.expand(-1, 3, -1, -1)
    n, _, h, w = u8.shape
    scale = max(1, round(cell_px / max(h, w)))
    cw, ch = w * scale, h * scale
    f_text, f_title = _font(11), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((probe.textbbox((0, 0), t, font=f_text)[2] for t in row_labels), default=0) + 12
    cap_h, gap, margin = 14, 4, 8
    top = margin + (22 if title else 0)
    n_rows = (n + n_cols - 1) // n_cols
    width = margin + label_w + n_cols * (cw + gap) + margin
    if title:
        width = max(width, probe.textbbox((0, 0), title, font=f_title)[2] + 2 * margin)
    canvas = Image.new("RGB", (int(width), int(top + n_rows * (ch + cap_h + gap) + margin)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((width / 2, margin), title, fill="black", font=f_title, anchor="ma")
    pixels = u8.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, n_cols)
        x0, y0 = margin + label_w + c * (cw + gap), top + r * (ch + cap_h + gap)
        cell = pixels[i].repeat(scale, axis=0).repeat(scale, axis=1)
        canvas.paste(Image.fromarray(cell), (int(x0), int(y0)))
        if i < len(captions):
            draw.text((x0 + cw / 2, y0 + ch + 1), captions[i], fill=colours[i], font=f_text, anchor="ma")
    for r, label in enumerate(row_labels):
        draw.text((margin + label_w - 8, top + r * (ch + cap_h + gap) + ch / 2), label, fill="black", font=f_text,
                  anchor="rm")
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


# ------------------------------------------------------------------------------------------------ data
def condition_key(module) -> str | None:
    """The batch key the module's conditioner reads (``label``, ``text`` or None)."""
    return getattr(module.conditioner, "batch_key", None)


def fixed_real_batch(datamodule, n: int, split: str = "val") -> dict[str, Any]:
    """The first ``n`` items of the datamodule's (unshuffled) ``split`` loader as one dict batch, on the CPU.

    Validation loaders are not shuffled, so this is the same batch at every call; it is the research log's
    "fixed batch of real images" for reconstructions. The datamodule must be set up (the trainer or report.py did).
    """
    if datamodule is None:
        raise ValueError("this diagnostic needs real data: run it inside trainer.fit(datamodule=...) or give report.py "
                         "a checkpoint whose run_config has a datamodule")
    loader = datamodule.val_dataloader() if split == "val" else datamodule.train_dataloader()
    xs, rest = [], {}
    count = 0
    for batch in loader:
        k = min(n - count, batch["x"].shape[0])
        xs.append(batch["x"][:k].cpu())
        for key in ("label", "text"):
            if key in batch:
                rest.setdefault(key, []).extend(batch[key][:k].tolist() if torch.is_tensor(batch[key])
                                                else list(batch[key][:k]))
        count += k
        if count >= n:
            break
    if not xs:
        raise ValueError(f"{type(datamodule).__name__}.{split}_dataloader() yielded no batches")
    out: dict[str, Any] = {"x": torch.cat(xs)}
    if "label" in rest:
        out["label"] = torch.tensor(rest["label"], dtype=torch.long)
    if "text" in rest:
        out["text"] = rest["text"]
    return out

