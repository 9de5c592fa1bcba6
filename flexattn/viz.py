"""What the model looked at: the image with its selected 9x9 cells and a selection heat map.

Geometry (docs/DESIGN.md section 3): the model pads the image to a centred square of side
S = max(w, h) and cuts that square into a 9x9 grid of cells (the 8x8-token blocks of the
72x72 high-resolution grid) and a 24x24 grid of low-resolution tokens. The overlay is drawn
on the *original* image: the grids are laid over the padded square and cropped back to the
image, so the picture has the image's own aspect and cells along the long sides of a
non-square image are partly cut off (the padding around them is not shown).

Layers, bottom to top:
1. the image (downscaled so its long side is at most ``max_side``);
2. the selection map (layer s's attention over the 576 image tokens at the last step), margin
   rows/columns zeroed and min-max normalised exactly as selection does, colour-mapped with a
   matplotlib colormap and blended with weight ``alpha * value`` (so weakly attended tokens
   leave the image as it is); each square is one low-resolution token;
3. cells outside ``hr_cells`` (the union of cells used over the generation) darkened by
   ``dim``; selected cells keep their brightness and get an ``outline``-coloured border drawn
   inside their own box, so neighbouring cells never share border pixels.

Pillow and matplotlib only (no model, no tensors), so drivers can draw from Parquet rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

OUTLINE = (0, 255, 0)  # selected-cell border
COLORMAP = "turbo"
MAX_SIDE = 1024


def cell_box(row: int, col: int, width: int, height: int, grid: int = 9,
             scale: float = 1.0) -> tuple[int, int, int, int]:
    """Pixel box [x0, x1) x [y0, y1) of cell (row, col) in the (scaled) original image.

    The cell spans [col, col + 1) * S / grid (x) and [row, row + 1) * S / grid (y) of the
    padded square, shifted by the paste offset ((S - w) // 2, (S - h) // 2) and clipped to
    the image; an empty box (x0 >= x1 or y0 >= y1) means the cell lies in the padding."""
    side = max(width, height)
    ox, oy = (side - width) // 2, (side - height) // 2
    out_w, out_h = _scaled_size(width, height, scale)
    cell = side / grid

    def edge(index: int, offset: int, limit: int) -> int:
        return min(max(round((index * cell - offset) * scale), 0), limit)

    return (edge(col, ox, out_w), edge(row, oy, out_h),
            edge(col + 1, ox, out_w), edge(row + 1, oy, out_h))


def _scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, round(width * scale)), max(1, round(height * scale))


def margin_zeroed(selection_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """The map as selection sees it: the rows (w > h) or columns (h > w) that padding covers
    set to 0 (``selection.margin_keep``)."""
    import torch

    from .selection import margin_keep

    keep = margin_keep(torch.tensor([[width, height]]), selection_map.shape[0])[0].numpy()
    return selection_map.astype(np.float32) * keep


def heat_rgba(selection_map: Sequence[float], width: int, height: int,
              colormap: str = COLORMAP) -> np.ndarray:
    """576 floats -> uint8 [24, 24, 4]: margin-zeroed, min-max normalised, colour-mapped; the
    alpha channel is the normalised value (a constant map is all transparent)."""
    import matplotlib

    values = np.asarray(selection_map, dtype=np.float32)
    grid = math.isqrt(values.size)
    if grid * grid != values.size or grid == 0:
        raise ValueError(f"selection_map must hold a square number of values, got {values.size}")
    x = margin_zeroed(values.reshape(grid, grid), width, height)
    lo, hi = float(x.min()), float(x.max())
    norm = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    rgba = matplotlib.colormaps[colormap](norm)  # [G, G, 4] float in [0, 1]
    rgba[..., 3] = norm
    return (rgba * 255.0 + 0.5).astype(np.uint8)


def draw_overlay(image: Image.Image, hr_cells: Sequence[bool],
                 selection_map: Sequence[float] | None = None, *, max_side: int = MAX_SIDE,
                 alpha: float = 0.7, dim: float = 0.55, outline: tuple[int, int, int] = OUTLINE,
                 line_width: int | None = None, colormap: str = COLORMAP) -> Image.Image:
    """The overlay as an RGB image of the original's aspect (long side <= ``max_side``).

    image: the original image (any mode), as the model received it before padding.
    hr_cells: 81 bools, row-major 9x9 (a ``Generation``'s or output row's ``hr_cells``).
    selection_map: 576 floats (24x24 row-major) or None to draw the cells only."""
    cells = [bool(c) for c in hr_cells]
    grid = math.isqrt(len(cells))
    if grid * grid != len(cells) or grid == 0:
        raise ValueError(f"hr_cells must hold a square number of cells, got {len(cells)}")
    if not 0 <= alpha <= 1 or not 0 <= dim <= 1:
        raise ValueError(f"alpha and dim must be within [0, 1], got {alpha}, {dim}")
    width, height = image.size
    scale = min(1.0, max_side / max(width, height))
    out_w, out_h = _scaled_size(width, height, scale)
    base = image.convert("RGB")
    if (out_w, out_h) != base.size:
        base = base.resize((out_w, out_h), Image.Resampling.LANCZOS)

    if selection_map is not None:
        # The heat map covers the padded square; scale it up with it and crop the image part.
        side = round(max(width, height) * scale)
        ox = round((max(width, height) - width) // 2 * scale)
        oy = round((max(width, height) - height) // 2 * scale)
        heat = Image.fromarray(heat_rgba(selection_map, width, height, colormap), "RGBA")
        heat = heat.resize((max(side, 1), max(side, 1)), Image.Resampling.NEAREST)
        heat = heat.crop((ox, oy, ox + out_w, oy + out_h))
        weight = heat.getchannel("A").point(lambda a: round(a * alpha))
        base = Image.composite(heat.convert("RGB"), base, weight)

    dimmed = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), dim)
    keep = Image.new("L", base.size, 0)
    mask_draw = ImageDraw.Draw(keep)
    boxes = [cell_box(i // grid, i % grid, width, height, grid, scale) for i in range(len(cells))]
    for selected, (x0, y0, x1, y1) in zip(cells, boxes):
        if selected and x1 > x0 and y1 > y0:
            mask_draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    out = Image.composite(base, dimmed, keep)

    lw = line_width or max(2, round(min(out_w, out_h) / 250))
    draw = ImageDraw.Draw(out)
    for selected, (x0, y0, x1, y1) in zip(cells, boxes):
        if selected and x1 > x0 and y1 > y0:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=outline, width=lw)
    return out


def save_overlay(path, image: Image.Image, hr_cells: Sequence[bool],
                 selection_map: Sequence[float] | None = None, **kwargs) -> Image.Image:
    """``draw_overlay`` and write it as PNG to ``path`` (a path or a binary file object)."""
    out = draw_overlay(image, hr_cells, selection_map, **kwargs)
    out.save(path, format="PNG")
    return out
