"""Drawing helpers every diagnostic shares: image mosaics with titles, captioned grids, figure files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from difflab.ops.atomic import atomic_write
from difflab.utils.images import make_grid, to_uint8

PAD = 1  # pixels between cells in every mosaic


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


def new_figure(width_px: float, height_px: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(width_px, 200) / dpi, max(height_px, 120) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib Figure as PNG atomically (no pyplot, so no global backend state); returns the path."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def labelled_mosaic(
    blocks: Sequence[np.ndarray],
    block_titles: Sequence[str],
    row_labels: Sequence[str],
    path: str | Path,
    title: str | None = None,
    cell_px: int = 48,
) -> Path:
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
    f_title, f_text = font(15), font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(text: str, font) -> int:
        box = probe.textbbox((0, 0), text, font=font)
        return box[2] - box[0]

    gap, margin = 16, 8
    label_w = max((text_w(t, f_text) for t in row_labels), default=0) + (12 if row_labels else 0)
    slots = [max(b.shape[1], text_w(t, f_text) + 8) for b, t in zip(big, block_titles)]
    top = margin + (24 if title else 0) + 20
    width = max(
        margin + label_w + sum(slots) + gap * (len(big) - 1) + margin,
        text_w(title, f_title) + 2 * margin if title else 0,
    )
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


def captioned_grid(
    images: torch.Tensor,
    n_cols: int,
    captions: Sequence[str],
    colours: Sequence[str],
    row_labels: Sequence[str],
    path: str | Path,
    title: str | None = None,
    cell_px: int = 64,
) -> Path:
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
    f_text, f_title = font(11), font(14)
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
        draw.text(
            (margin + label_w - 8, top + r * (ch + cap_h + gap) + ch / 2), label, fill="black", font=f_text, anchor="rm"
        )
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


# ------------------------------------------------------------------------------------------------ data
def fixed_real_batch(datamodule, n: int, split: str = "val") -> dict[str, Any]:
    """The first ``n`` items of the datamodule's (unshuffled) ``split`` loader as one dict batch, on the CPU.

    Validation loaders are not shuffled, so this is the same batch at every call; it is the research log's
    "fixed batch of real images" for reconstructions. The datamodule must be set up (the trainer or report.py did).
    """
    if datamodule is None:
        raise ValueError(
            "this diagnostic needs real data: run it inside trainer.fit(datamodule=...) or give report.py "
            "a checkpoint whose run_config has a datamodule"
        )
    loader = datamodule.val_dataloader() if split == "val" else datamodule.train_dataloader()
    xs, rest = [], {}
    count = 0
    for batch in loader:
        k = min(n - count, batch["x"].shape[0])
        xs.append(batch["x"][:k].cpu())
        for key in ("label", "text"):
            if key in batch:
                rest.setdefault(key, []).extend(
                    batch[key][:k].tolist() if torch.is_tensor(batch[key]) else list(batch[key][:k])
                )
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
