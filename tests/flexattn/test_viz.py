"""Selection overlays: geometry checked by hand on synthetic inputs, then `flexattn viz` on the
golden tiny model with its own `hr_cells`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from flexattn.cli import main
from flexattn.viz import OUTLINE, cell_box, draw_overlay, heat_rgba, margin_zeroed

from .conftest import GOLDEN_MODEL


def test_cell_boxes_by_hand():
    # 900x600: padded square S = 900, image pasted at y = 150, cells of 100 px.
    assert cell_box(0, 0, 900, 600) == (0, 0, 100, 0)  # in the padding: empty
    assert cell_box(1, 0, 900, 600) == (0, 0, 100, 50)  # half cut by the top edge
    assert cell_box(2, 3, 900, 600) == (300, 50, 400, 150)
    assert cell_box(7, 8, 900, 600) == (800, 550, 900, 600)
    # 600x900 (portrait): x offset 150.
    assert cell_box(4, 2, 600, 900) == (50, 400, 150, 500)
    # Scaled by half.
    assert cell_box(2, 3, 900, 600, scale=0.5) == (150, 25, 200, 75)


def _pixel(img: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(img)[y, x])


def assert_cells_drawn(img: Image.Image, cells, width: int, height: int) -> tuple[int, int]:
    """Every visible selected cell has the outline colour on its inner left edge; every visible
    unselected cell has not, and is darker at its centre. Returns (selected, unselected)
    visible cells checked."""
    scale = img.size[0] / width
    seen = [0, 0]
    for i, selected in enumerate(cells):
        x0, y0, x1, y1 = cell_box(i // 9, i % 9, width, height, scale=scale)
        if x1 - x0 < 6 or y1 - y0 < 6:
            continue
        edge = _pixel(img, x0, (y0 + y1) // 2)
        if selected:
            assert edge == OUTLINE, (i, edge)
        else:
            assert edge != OUTLINE, (i, edge)
        seen[0 if selected else 1] += 1
    return seen[0], seen[1]


def test_overlay_keeps_the_aspect_and_marks_exactly_the_selected_cells():
    white = Image.new("RGB", (900, 600), (255, 255, 255))
    cells = [False] * 81
    for i in (2 * 9 + 3, 4 * 9 + 4, 7 * 9 + 8, 1 * 9 + 0):
        cells[i] = True
    out = draw_overlay(white, cells, [0.0] * 576)  # constant map: no heat
    assert out.size == (900, 600)
    assert _pixel(out, 300, 100) == OUTLINE  # cell (2, 3): inner left edge
    assert _pixel(out, 350, 100) == (255, 255, 255)  # its centre: image untouched
    dim = _pixel(out, 550, 100)  # cell (2, 5), unselected: darkened
    assert dim[0] < 200 and dim == (dim[0],) * 3
    assert _pixel(out, 500, 100) != OUTLINE  # left edge of cell (2, 5)
    assert assert_cells_drawn(out, cells, 900, 600) == (4, 59)


def test_heat_map_lies_over_the_padded_square_and_margins_are_zeroed():
    # One hot token at row 12, column 6 of the 24x24 grid; the image is 960x480, so the
    # padded square is 960 (token = 40 px) and the image starts at y = 240.
    sel = np.zeros((24, 24), np.float32)
    sel[12, 6] = 1.0
    sel[0, 0] = 5.0  # in the padding margin: zeroed before normalising, as selection does
    assert margin_zeroed(sel, 960, 480)[0, 0] == 0.0
    rgba = heat_rgba(sel.ravel(), 960, 480)
    assert rgba[12, 6, 3] == 255 and rgba[0, 0, 3] == 0
    grey = Image.new("RGB", (960, 480), (128, 128, 128))
    out = draw_overlay(grey, [True] * 81, sel.ravel(), alpha=1.0, line_width=1)
    hot = _pixel(out, 6 * 40 + 20, 12 * 40 - 240 + 20)
    assert hot != (128, 128, 128) and hot == tuple(int(v) for v in rgba[12, 6, :3])
    assert _pixel(out, 2 * 40 + 20, 3 * 40 + 20) == (128, 128, 128)  # cold token: no tint


def test_large_images_are_downscaled_with_their_aspect():
    out = draw_overlay(Image.new("L", (3000, 1000), 90), [True] * 81, None, max_side=1024)
    assert out.size == (1024, 341) and out.mode == "RGB"


def test_bad_inputs_raise():
    img = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="hr_cells"):
        draw_overlay(img, [True] * 80)
    with pytest.raises(ValueError, match="selection_map"):
        draw_overlay(img, [True] * 81, [0.0] * 575)


def test_flexattn_viz_cli_draws_the_generation(tmp_path, capsys):
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 255, (600, 1000, 3), dtype=np.uint8))
    image.save(tmp_path / "scene.png")
    out = tmp_path / "viz" / "scene_overlay.png"
    code = main(["viz", "--model", str(GOLDEN_MODEL), "--image", str(tmp_path / "scene.png"),
                 "--prompt", "What is in this image?", "--out", str(out), "--max-new-tokens",
                 "3", "--device", "cpu", "--json"])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    drawn = Image.open(out)
    assert drawn.format == "PNG" and drawn.size == (1000, 600)
    cells = info["hr_cells"]
    assert len(cells) == 81 and len(info["selection_map"]) == 576
    selected, unselected = assert_cells_drawn(drawn.convert("RGB"), cells, 1000, 600)
    assert selected >= 1 and unselected >= 1  # both kinds checked on this image


def test_flexattn_viz_cli_refuses_modes_without_selection(tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    code = main(["viz", "--model", str(GOLDEN_MODEL), "--image", str(tmp_path / "a.png"),
                 "--prompt", "Hi", "--out", str(tmp_path / "o.png"), "--mode", "lowres"])
    assert code == 2 and "flexattn" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
