"""High-resolution selection against a plain-Python reference of docs/DESIGN.md section 3."""

from __future__ import annotations

import math
import random

import pytest
import torch

from flexattn.selection import blocks_to_tokens, margin_keep, select_high_res

G, P, HR = 24, 9, 72


def reference_select(amap: list[list[float]], w: int, h: int, threshold: float) -> list[bool]:
    """Loops only: margin zeroing, min-max, threshold, adaptive max pool 24->9, 72x72 upsample."""
    x = [row[:] for row in amap]
    m = int((abs(w - h) // 2) / max(w, h) * G)
    for r in range(G):
        for c in range(G):
            if m and w > h and (r < m or r >= G - m):
                x[r][c] = 0.0
            if m and h > w and (c < m or c >= G - m):
                x[r][c] = 0.0
    lo = min(min(row) for row in x)
    hi = max(max(row) for row in x)
    if hi == lo:
        return [False] * (HR * HR)
    keep = [[255 * ((x[r][c] - lo) / (hi - lo)) > threshold for c in range(G)] for r in range(G)]
    cells = [[False] * P for _ in range(P)]
    for i in range(P):
        r0, r1 = (i * G) // P, math.ceil((i + 1) * G / P)
        for j in range(P):
            c0, c1 = (j * G) // P, math.ceil((j + 1) * G / P)
            cells[i][j] = any(keep[r][c] for r in range(r0, r1) for c in range(c0, c1))
    s = HR // P
    return [cells[r // s][c // s] for r in range(HR) for c in range(HR)]


def run(amap: list[list[float]], w: int, h: int, threshold: float = 48) -> list[bool]:
    t = torch.tensor(amap, dtype=torch.float32).view(1, G * G)
    keep = margin_keep(torch.tensor([[w, h]]), G)
    blocks = select_high_res(t, keep, threshold, P)
    return blocks_to_tokens(blocks, HR)[0].tolist()


def peak_map(cells: list[tuple[int, int]], base: float = 0.01) -> list[list[float]]:
    x = [[base] * G for _ in range(G)]
    for r, c in cells:
        x[r][c] = 1.0
    return x


def test_square_single_peak_selects_overlapping_pool_bins():
    # cell (5, 5) lies in pool rows/cols 1 ([2, 6)) and 2 ([5, 8)): a 2x2 block of cells
    got = run(peak_map([(5, 5)]), 1000, 1000)
    assert got == reference_select(peak_map([(5, 5)]), 1000, 1000, 48)
    assert sum(got) == 4 * 64
    grid = torch.tensor(got).view(HR, HR)
    assert grid[8:24, 8:24].all() and grid.sum() == 256


def test_wide_image_zeroes_padding_rows():
    # 2000x1000: m = int(500 / 2000 * 24) = 6 rows each side are padding; a peak there is ignored
    amap = peak_map([(1, 3), (12, 12)])
    got = run(amap, 2000, 1000)
    assert got == reference_select(amap, 2000, 1000, 48)
    grid = torch.tensor(got).view(HR, HR)
    assert not grid[:8].any()  # pool row 0 covers map rows 0-2: all padding
    assert grid[32:40, 32:40].all()  # the real peak's block


def test_tall_image_zeroes_padding_columns():
    amap = peak_map([(3, 1), (12, 12)])
    got = run(amap, 600, 1500)
    assert got == reference_select(amap, 600, 1500, 48)
    assert not torch.tensor(got).view(HR, HR)[:, :8].any()


def test_constant_map_selects_nothing():
    assert sum(run([[0.3] * G for _ in range(G)], 640, 640)) == 0
    # constant after margin zeroing too: everything that is not padding is zero
    assert sum(run([[0.0] * G for _ in range(G)], 2000, 1000)) == 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("wh", [(640, 480), (600, 1500), (2000, 1000), (1008, 1008), (500, 497)])
def test_random_maps_match_reference(seed, wh):
    rng = random.Random(seed)
    amap = [[rng.random() ** 4 for _ in range(G)] for _ in range(G)]
    threshold = rng.choice([0, 20, 48, 120, 254])
    got = run(amap, *wh, threshold=threshold)
    assert got == reference_select(amap, *wh, threshold)
    assert sum(got) % 64 == 0


def test_threshold_255_selects_nothing_and_batch_is_per_sample():
    amaps = torch.rand(3, G * G)
    keep = margin_keep(torch.tensor([[640, 480], [480, 640], [300, 300]]), G)
    assert not select_high_res(amaps, keep, 255, P).any()
    batch = select_high_res(amaps, keep, 48, P)
    for i in range(3):
        alone = select_high_res(amaps[i:i + 1], keep[i:i + 1], 48, P)
        assert torch.equal(batch[i:i + 1], alone)
