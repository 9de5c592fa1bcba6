"""Image preprocessing (docs/DESIGN.md section 3, "Images"): LLaVA "pad" mode, bicubic resize to the
high-resolution side, CLIP normalisation, the antialiased low-resolution view and the 3x3 tiles;
for plain LLaVA-1.5 checkpoints, the low-resolution view made straight from the image
(``direct_view``), as LLaVA-1.5 and Hugging Face's ``LlavaImageProcessor(do_pad=True)`` make it."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .options import pad_colour
from .padding import square_resize


def prepare_image(image: Image.Image, highres_size: int,
                  mean: tuple[float, float, float]) -> tuple[Image.Image, tuple[int, int]]:
    """Any PIL image -> (padded square RGB image of side ``highres_size``, original (w, h))."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return square_resize(image, highres_size, pad_colour(mean)), image.size


def normalise(images: list[Image.Image], mean: tuple[float, float, float],
              std: tuple[float, float, float], device: torch.device | str = "cpu"
              ) -> torch.Tensor:
    """uint8 RGB PIL images of one size -> float32 tensor [N, 3, H, W], (x / 255 - mean) / std.

    The uint8 pixels move to ``device`` first, so the float work happens there."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # [N, H, W, 3]
    # channels first and contiguous while still uint8, then in place: the same arithmetic as
    # (x / 255 - mean) / std, several times faster than on a channels-last float view
    x = torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).contiguous().to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.mul_(1.0 / 255.0).sub_(m).div_(s)


def lowres_view(highres: torch.Tensor, lowres_size: int) -> torch.Tensor:
    """[N, 3, 1008, 1008] normalised -> [N, 3, 336, 336] by antialiased bilinear downsampling."""
    return F.interpolate(highres, size=(lowres_size, lowres_size), mode="bilinear",
                         align_corners=False, antialias=True)


def tiles(highres: torch.Tensor, tile: int) -> torch.Tensor:
    """[N, 3, Z*t, Z*t] -> [N*Z*Z, 3, t, t], tiles of each image row-major."""
    n, c, hgt, _ = highres.shape
    z = hgt // tile
    x = highres.view(n, c, z, tile, z, tile).permute(0, 2, 4, 1, 3, 5)  # [N, Zr, Zc, C, t, t]
    return x.reshape(n * z * z, c, tile, tile)


def direct_view(images: list[Image.Image], size: int, mean: tuple[float, float, float],
                std: tuple[float, float, float], device: torch.device | str = "cpu"
                ) -> torch.Tensor:
    """PIL images -> [N, 3, size, size] float32: each padded to a square with the mean colour
    and resized (PIL bicubic) straight to ``size``, then rescaled and normalised with Hugging
    Face's arithmetic (x * 1/255 in float64, cast to float32, then (x - mean) / std in float32),
    so that the pixels equal ``LlavaImageProcessor(do_pad=True)``'s bit for bit."""
    squares = [prepare_image(im, size, mean)[0] for im in images]
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in squares])  # [N, H, W, 3]
    x = torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).to(torch.float64)
    x = x.mul_(1.0 / 255.0).to(torch.float32).contiguous()
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)
