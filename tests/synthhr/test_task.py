"""The SynthHR generator against its definition: seeded, deterministic, boxes and patterns
drawn exactly as specified, and a manifest the RSVQA job reads as it is."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flexattn.answers import ANSWER_SUFFIX
from synthhr import task as synthhr


def reference_pattern(name: str, i: int, j: int) -> bool:
    """Pixel (i, j) of an interior is light, written out per pattern with Python's own //."""
    return {"checker": (i + j) % 2 == 0, "squares": (i // 2 + j // 2) % 2 == 0,
            "rising": ((i + j) // 2) % 2 == 0, "falling": ((i - j) // 2) % 2 == 0}[name]


@pytest.mark.parametrize("index", range(6))
def test_scenes_follow_the_definition(index):
    scene = synthhr.draw_scene(11, index)
    img = scene.image.astype(int)
    assert scene.image.shape == (1008, 1008, 3) and scene.image.dtype == np.uint8
    boxes = scene.boxes
    assert 2 <= len(boxes) <= 4
    assert len({b.colour for b in boxes}) == len(boxes)
    assert 0 <= scene.target < len(boxes)
    covered = np.zeros((1008, 1008), dtype=bool)
    for k, box in enumerate(boxes):
        assert 72 <= box.side <= 120
        assert 16 <= box.x0 <= 1008 - 16 - box.side and 16 <= box.y0 <= 1008 - 16 - box.side
        for other in boxes[k + 1:]:
            gap_x = max(other.x0 - box.x0 - box.side, box.x0 - other.x0 - other.side)
            gap_y = max(other.y0 - box.y0 - box.side, box.y0 - other.y0 - other.side)
            assert gap_x >= 32 or gap_y >= 32
        x0, y0, s = box.x0, box.y0, box.side
        outer = img[y0:y0 + s, x0:x0 + s]
        ring = np.ones((s, s), dtype=bool)
        ring[6:s - 6, 6:s - 6] = False
        assert (outer[ring] == synthhr.COLOURS[box.colour]).all()  # a 6 px border, exact
        inner = outer[6:s - 6, 6:s - 6]
        n = s - 12
        light = np.array([[reference_pattern(box.pattern, i, j) for j in range(n)]
                          for i in range(n)])
        base = np.where(light, 184, 72)[:, :, None]
        noise = inner - base
        assert noise.min() >= -10 and noise.max() <= 10  # pattern plus noise in [-10, 10]
        assert noise.std() > 4  # the noise is there
        covered[y0:y0 + s, x0:x0 + s] = True
    bg = img[~covered]
    assert bg.min() >= 30 and bg.max() <= 225


def test_patterns_have_one_mean_and_vanish_at_336():
    n = 96
    means = []
    for name in synthhr.PATTERNS:
        tile = synthhr.pattern_tile(name, n)
        means.append(tile.mean())
        # a 3x downsampling (what the 336 px view does to 1008 px) leaves almost no contrast
        grey = np.where(tile, 184.0, 72.0)
        small = grey.reshape(n // 3, 3, n // 3, 3).mean(axis=(1, 3))
        assert small.std() < 0.2 * grey.std()
    assert max(means) - min(means) < 0.02


def test_scenes_are_deterministic_per_seed_and_index():
    a, b = synthhr.draw_scene(3, 7), synthhr.draw_scene(3, 7)
    assert np.array_equal(a.image, b.image) and a.boxes == b.boxes
    c = synthhr.draw_scene(4, 7)
    assert not np.array_equal(a.image, c.image)


def test_questions_of_a_scene():
    scene = synthhr.draw_scene(5, 2)
    pattern, count = synthhr.scene_questions(scene, "img")
    box = scene.boxes[scene.target]
    assert pattern.question == f"What pattern is inside the {box.colour} box?"
    assert pattern.answer == box.pattern and pattern.type == "pattern"
    assert count.question == "How many boxes are there?"
    assert count.answer == {2: "two", 3: "three", 4: "four"}[len(scene.boxes)]
    assert [synthhr.Box(**b) for b in json.loads(pattern.boxes)] == list(scene.boxes)


def test_grid_cells_of_a_box():
    box = synthhr.Box(x0=100, y0=330, side=100, colour="red", pattern="checker")
    cells = synthhr.box_mask(box, 9)  # 112 px cells: x 100..199 -> 0, 1; y 330..429 -> 2, 3
    assert sorted(zip(*np.nonzero(cells))) == [(2, 0), (2, 1), (3, 0), (3, 1)]
    inner = synthhr.box_mask(box, 9, inset=6)  # x 106..193, y 336..423
    assert sorted(zip(*np.nonzero(inner))) == [(3, 0), (3, 1)]
    assert synthhr.centre_cell(box) == 3 * 9 + 1  # centre (150, 380)


def test_write_set_is_a_manifest_the_rsvqa_job_reads(tmp_path):
    from pipeline.rsvqa import read_questions

    path = synthhr.write_set(tmp_path / "set", images=3, seed=9)
    table = pq.read_table(path)
    assert table.num_rows == 6
    assert set(table.column("type").to_pylist()) == {"pattern", "count"}
    first = table.to_pylist()[0]
    scene = synthhr.draw_scene(9, 0)
    assert np.array_equal(np.asarray(Image.open(path.parent / first["image_uri"])), scene.image)
    questions = read_questions(str(path))
    assert questions.column("question_type").to_pylist() == table.column("type").to_pylist()
    assert questions.column("ground_truth").to_pylist() == table.column("answer").to_pylist()
    assert questions.column("question").to_pylist()[0].endswith("\n" + ANSWER_SUFFIX)


def test_task_command_writes_a_set(tmp_path, capsys):
    assert synthhr.main(["--out", str(tmp_path / "set"), "--images", "2", "--seed", "3"]) == 0
    assert "wrote 4 questions on 2 images" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "set" / "manifest.parquet").num_rows == 4
    with pytest.raises(SystemExit):
        synthhr.main(["--out", str(tmp_path / "bad"), "--images", "0", "--seed", "3"])
