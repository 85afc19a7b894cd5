"""The one image-grid drawer: tiles in rows, optional row names on the left and column names on top.

Sample sheets (`fae sample`'s grid.png: a row per class) and reconstruction sheets (`recon_grid.png`: a column per
decoder) are both arrangements of this.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch


def draw_grid(rows: Sequence[Sequence[np.ndarray]], row_names: Sequence[str] | None = None,
              column_names: Sequence[str] | None = None, pad: int = 2, min_cell: int = 0):
    """A PIL image of `rows` of uint8 (H,W,3) tiles, all of one size. Tiles are upscaled by an integer factor
    (nearest neighbour, so pixels and seams stay visible) until a side reaches `min_cell`."""
    from PIL import Image, ImageDraw, ImageFont

    tiles = [t for row in rows for t in row]
    if not tiles:
        raise ValueError("draw_grid: no images to draw")
    h, w = tiles[0].shape[:2]
    scale = max(1, -(-min_cell // max(h, w)))
    ch, cw = h * scale, w * scale
    font = ImageFont.load_default()
    label_w = 8 + max(int(font.getlength(n)) for n in row_names) if row_names else 0
    header = 16 if column_names else 0
    columns = max(len(row) for row in rows) if not column_names else len(column_names)
    canvas = Image.new("RGB", (label_w + columns * (cw + pad) + pad, header + len(rows) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(column_names or []):
        draw.text((label_w + pad + c * (cw + pad), 2), name[: max(4, cw // 6)], fill="black", font=font)
    for r, row in enumerate(rows):
        y = header + pad + r * (ch + pad) if column_names else pad + r * (ch + pad)
        if row_names and row_names[r]:
            draw.text((4, y + ch // 2), row_names[r], fill="black", font=font, anchor="lm")
        for c, tile in enumerate(row):
            image = Image.fromarray(np.ascontiguousarray(tile))
            canvas.paste(image.resize((cw, ch), Image.Resampling.NEAREST) if scale > 1 else image,
                         (label_w + pad + c * (cw + pad), y))
    return canvas


def float_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0,1] -> uint8 of the same shape: clamp to [0,1], times 255, plus 0.5, truncate.

    Round half up, torchvision's `save_image` convention, so a tensor's uint8 values are those of the PNG a
    torchvision user would save from it (round() would round halves to even, which no image writer does).
    """
    return images.detach().float().clamp(0, 1).mul(255).add(0.5).to(torch.uint8)


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) float in [0,1] -> uint8 NumPy (..., H, W, 3), rounded by `float_to_uint8`: a tile for
    `draw_grid` from (3,H,W), or a batch (N,H,W,3) as saved image files hold it from (N,3,H,W)."""
    return float_to_uint8(images).movedim(-3, -1).cpu().numpy()


def draw_columns(columns: Mapping[str, Sequence[torch.Tensor] | torch.Tensor], pad: int = 2, min_cell: int = 0):
    """Image sets side by side: one labelled column per non-empty entry (images (3,H,W) in [0,1], e.g. original |
    reconstruction), one row per item, as many rows as the shortest column."""
    names = [n for n, images in columns.items() if len(images)]
    count = min(len(columns[n]) for n in names)
    rows = [[to_uint8_hwc(columns[n][r]) for n in names] for r in range(count)]
    return draw_grid(rows, column_names=names, pad=pad, min_cell=min_cell)
