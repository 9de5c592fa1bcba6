"""High-resolution feature selection and the rotary tables of high-resolution keys
(docs/DESIGN.md section 3). Everything works on the 9x9 block grid: the 72x72 token mask is a
nearest upsampling of it, so a selection is a set of 8x8-token blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def margin_keep(image_sizes: torch.Tensor, grid: int) -> torch.Tensor:
    """Cells not covered by padding. image_sizes: [B, 2] (w, h) -> [B, grid, grid] float 0/1.

    m = int((|w - h| // 2) / max(w, h) * grid) rows (w > h) or columns (h > w) on each side."""
    b = image_sizes.shape[0]
    keep = torch.ones(b, grid, grid)
    for i, (w, h) in enumerate(image_sizes.tolist()):
        m = int((abs(w - h) // 2) / max(w, h) * grid)
        if m == 0:
            continue
        if w > h:
            keep[i, :m, :] = 0
            keep[i, grid - m:, :] = 0
        else:
            keep[i, :, :m] = 0
            keep[i, :, grid - m:] = 0
    return keep


def select_high_res(attn_map: torch.Tensor, keep: torch.Tensor, threshold: float,
                    pool_grid: int) -> torch.Tensor:
    """Selection of high-resolution blocks from one layer's attention over the image tokens.

    attn_map: [B, G*G] attention of the last query (summed over heads) on the low-res tokens.
    keep: [B, G, G] margin mask from ``margin_keep``.
    Returns the block mask [B, pool_grid * pool_grid] bool (row-major 9x9 cells)."""
    b = attn_map.shape[0]
    g = keep.shape[-1]
    x = attn_map.float().view(b, g, g) * keep.to(attn_map.device)
    flat = x.view(b, -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    norm = (flat - lo) / torch.where(span > 0, span, torch.ones_like(span))
    cells = (255 * norm > threshold) & (span > 0)  # a constant map selects nothing
    pooled = F.adaptive_max_pool2d(cells.view(b, 1, g, g).float(), pool_grid)
    return pooled.view(b, -1) > 0


def blocks_to_tokens(block_mask: torch.Tensor, hr_grid: int) -> torch.Tensor:
    """[B, P*P] block mask -> [B, hr_grid**2] token mask over the high-res grid, row-major."""
    b, n = block_mask.shape
    p = round(n ** 0.5)
    up = F.interpolate(block_mask.view(b, 1, p, p).float(), size=(hr_grid, hr_grid),
                       mode="nearest")
    return up.view(b, -1) > 0


def hr_rope_tables(cos: torch.Tensor, sin: torch.Tensor, hr_grid: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables of high-resolution keys from those of the image tokens.

    cos, sin: [B, G*G, D] float32 at the image tokens' positions -> [B, hr_grid**2, D]: each
    channel laid out as GxG and bicubically interpolated (align_corners=False, no clamping)."""
    def grow(t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        g = round(n ** 0.5)
        grid = t.float().permute(0, 2, 1).reshape(b, d, g, g)
        up = F.interpolate(grid, size=(hr_grid, hr_grid), mode="bicubic", align_corners=False)
        return up.reshape(b, d, hr_grid * hr_grid).permute(0, 2, 1)
    return grow(cos), grow(sin)


def to_blocks(x: torch.Tensor, hr_grid: int, pool_grid: int) -> torch.Tensor:
    """[B, hr_grid**2, ...] row-major -> [B, P*P, s*s, ...] grouped by 8x8 blocks (block-major)."""
    b = x.shape[0]
    rest = x.shape[2:]
    s = hr_grid // pool_grid
    y = x.reshape(b, pool_grid, s, pool_grid, s, *rest)
    y = y.transpose(2, 3)  # [B, P, P, s, s, ...]
    return y.reshape(b, pool_grid * pool_grid, s * s, *rest)
