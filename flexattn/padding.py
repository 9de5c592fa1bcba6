"""LLaVA's "pad" mode on PIL images (docs/DESIGN.md section 3, "Images"), shared by the model's
own preprocessing and the pipeline's decode stage. Pillow only, no torch."""

from __future__ import annotations

from PIL import Image


def square_resize(image: Image.Image, size: int, fill: tuple[int, int, int]) -> Image.Image:
    """An RGB image pasted at ((S - w) // 2, (S - h) // 2) on a square of side S = max(w, h)
    filled with ``fill``, then bicubic-resized to ``size`` (each step only when needed)."""
    width, height = image.size
    side = max(width, height)
    if width != height:
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image = canvas
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image
