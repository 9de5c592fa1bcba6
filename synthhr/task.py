"""SynthHR: a synthetic high-resolution VQA task the mini LLaVA-FlexAttn is trained on.

A 1008 px scene holds 2-4 square boxes, each with a coloured border and an interior filled with
one of four one-pixel grey patterns whose contrast the 336 px view averages away. "What pattern
is inside the {colour} box?" needs the 1008 px view inside one small box (the model finds the
box in the 336 px view, selects its cells and reads the high-resolution tokens there); "How
many boxes are there?" is answerable at 336 px. The distribution:

- background, per channel c: ``m_c + sum_k a_ck sin(2 pi (u_k x + v_k y) / 1008 + phi_ck)`` plus
  integer noise in [-6, 6], rounded and clipped to [30, 225]; m in [70, 185], a in [4, 20],
  integer frequencies u, v in [-4, 4] (not both 0, shared by the channels), phi in [0, 2 pi);
- 2, 3 or 4 boxes of outer side s in [72, 120], border 6 px, top-left corner in
  [16, 1008 - 16 - s], any two at least 32 px apart in x or in y, distinct border colours;
- interiors: ``checker`` ((i + j) % 2 == 0), ``squares`` ((i // 2 + j // 2) % 2 == 0),
  ``rising`` (((i + j) // 2) % 2 == 0), ``falling`` (((i - j) // 2) % 2 == 0) light (184), dark
  (72) elsewhere, plus integer noise in [-10, 10] per pixel and channel.

Everything is a function of ``(seed, index)``: image ``index`` of a set draws from
``numpy.random.default_rng([seed, index])`` in a fixed order, so any image can be made alone.

    python -m synthhr.task --out DIR --images N --seed S [--start I]

writes a set on disk (``write_set``): 1008 px PNG scenes and a manifest of their questions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SIZE = 1008
COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 190, 30),
    "blue": (30, 70, 230),
    "yellow": (235, 215, 25),
    "magenta": (215, 35, 215),
    "cyan": (25, 205, 215),
}
PATTERNS = ("checker", "squares", "rising", "falling")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
LIGHT, DARK = 184, 72
BORDER = 6
MIN_SIDE, MAX_SIDE = 72, 120
EDGE = 16  # smallest distance of a box from the image edge
GAP = 32  # smallest distance between two boxes, in x or in y
PATTERN_QUESTION = "What pattern is inside the {colour} box?"
COUNT_QUESTION = "How many boxes are there?"
MANIFEST = "manifest.parquet"


@dataclass(frozen=True)
class Box:
    x0: int  # left column of the outer square
    y0: int  # top row
    side: int  # outer side, border included
    colour: str
    pattern: str

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the square's centre, in pixels."""
        return self.x0 + self.side / 2, self.y0 + self.side / 2

    def apart(self, other: Box) -> bool:
        """At least GAP pixels between the two outer squares, in x or in y."""
        gap_x = max(other.x0 - (self.x0 + self.side), self.x0 - (other.x0 + other.side))
        gap_y = max(other.y0 - (self.y0 + self.side), self.y0 - (other.y0 + other.side))
        return gap_x >= GAP or gap_y >= GAP


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8 [SIZE, SIZE, 3]
    boxes: tuple[Box, ...]
    target: int  # index of the box the pattern question names


@dataclass(frozen=True)
class Question:
    id: str
    image_id: str
    question: str
    answer: str
    type: str  # "pattern" or "count"
    boxes: str  # JSON list of the image's boxes (x0, y0, side, colour, pattern)
    target: int  # the box a pattern question names; -1 for a count question


# ------------------------------------------------------------------------------------------
# drawing

def background(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """The smooth, noisy background: float64 [size, size, 3] before rounding and clipping.

    Each sinusoid sin(a_x + b_y) = sin a_x cos b_y + cos a_x sin b_y is a sum of two outer
    products, so a channel is one [size, 16] x [16, size] product."""
    mean = rng.uniform(70, 185, size=3)
    amp = rng.uniform(4, 20, size=(3, 4))
    freq = np.empty((4, 2), dtype=np.int64)
    for k in range(4):
        while True:
            u, v = rng.integers(-4, 5, size=2)
            if u or v:
                break
        freq[k] = u, v
    phase = rng.uniform(0, 2 * np.pi, size=(3, 4))
    noise = rng.integers(-6, 7, size=(size, size, 3))
    coord = np.arange(size) * (2 * np.pi / size)
    out = np.empty((size, size, 3))
    for c in range(3):
        ax = coord[None, :] * freq[:, 0:1] + phase[c][:, None]  # [4, x]
        by = coord[None, :] * freq[:, 1:2]  # [4, y]
        rows = np.concatenate([amp[c][:, None] * np.cos(by), amp[c][:, None] * np.sin(by)])
        cols = np.concatenate([np.sin(ax), np.cos(ax)])
        out[:, :, c] = mean[c] + rows.T @ cols  # [y, x]
    return out + noise


def pattern_tile(pattern: str, n: int) -> np.ndarray:
    """[n, n] bool: where the interior of side n is light (i rows, j columns)."""
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    if pattern == "checker":
        return (i + j) % 2 == 0
    if pattern == "squares":
        return (i // 2 + j // 2) % 2 == 0
    if pattern == "rising":
        return ((i + j) // 2) % 2 == 0
    if pattern == "falling":
        return ((i - j) // 2) % 2 == 0  # numpy's // floors, also for negative i - j
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def place_boxes(rng: np.random.Generator, size: int = SIZE) -> list[tuple[int, int, int]]:
    """2-4 (x0, y0, side) squares, each drawn again until it keeps GAP from the others."""
    count = int(rng.integers(2, 5))
    placed: list[tuple[int, int, int]] = []
    while len(placed) < count:
        side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        x0, y0 = (int(v) for v in rng.integers(EDGE, size - EDGE - side + 1, size=2))
        candidate = Box(x0, y0, side, "", "")
        if all(candidate.apart(Box(*p, "", "")) for p in placed):
            placed.append((x0, y0, side))
    return placed


def draw_scene(seed: int, index: int, size: int = SIZE) -> Scene:
    """Image ``index`` of the set ``seed``, its boxes and the box its pattern question names."""
    rng = np.random.default_rng([seed, index])
    canvas = background(rng, size)
    return draw_boxes(np.clip(np.rint(canvas), 30, 225).astype(np.uint8), rng)


def draw_boxes(image: np.ndarray, rng: np.random.Generator) -> Scene:
    """Boxes drawn on ``image`` (uint8 [size, size, 3], changed in place), and the box the
    pattern question names."""
    size = image.shape[0]
    squares = place_boxes(rng, size)
    names = list(COLOURS)
    colours = [names[i] for i in rng.permutation(len(names))[:len(squares)]]
    boxes = []
    for (x0, y0, side), colour in zip(squares, colours):
        pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
        image[y0:y0 + side, x0:x0 + side] = COLOURS[colour]
        n = side - 2 * BORDER
        light = pattern_tile(pattern, n)
        fill = np.where(light, LIGHT, DARK)[:, :, None] + rng.integers(-10, 11, size=(n, n, 3))
        image[y0 + BORDER:y0 + BORDER + n, x0 + BORDER:x0 + BORDER + n] = fill
        boxes.append(Box(x0, y0, side, colour, pattern))
    target = int(rng.integers(len(boxes)))
    return Scene(image=image, boxes=tuple(boxes), target=target)


def scene_questions(scene: Scene, image_id: str) -> tuple[Question, Question]:
    """The pattern question about ``scene.target`` and the count question."""
    box = scene.boxes[scene.target]
    boxes = json.dumps([asdict(b) for b in scene.boxes])
    return (
        Question(f"{image_id}-pattern", image_id, PATTERN_QUESTION.format(colour=box.colour),
                 box.pattern, "pattern", boxes, scene.target),
        Question(f"{image_id}-count", image_id, COUNT_QUESTION, COUNT_WORDS[len(scene.boxes)],
                 "count", boxes, -1),
    )


# ------------------------------------------------------------------------------------------
# where a box lies on the model's grids

def grid_span(start: int, length: int, cell: float, grid: int) -> range:
    """Indices of the cells of side ``cell`` px that [start, start + length) overlaps."""
    first = int(start // cell)
    last = int((start + length - 1) // cell)
    return range(max(first, 0), min(last, grid - 1) + 1)


def box_mask(box: Box, grid: int, inset: int = 0, size: int = SIZE) -> np.ndarray:
    """[grid, grid] bool: cells of a grid over the image that the box overlaps (``inset`` px
    inside its outer square: BORDER for the interior)."""
    cell = size / grid
    mask = np.zeros((grid, grid), dtype=bool)
    rows = grid_span(box.y0 + inset, box.side - 2 * inset, cell, grid)
    cols = grid_span(box.x0 + inset, box.side - 2 * inset, cell, grid)
    mask[rows.start:rows.stop, cols.start:cols.stop] = True
    return mask


def centre_cell(box: Box, grid: int = 9, size: int = SIZE) -> int:
    """Row-major index of the grid cell holding the box's centre."""
    x, y = box.centre
    cell = size / grid
    return int(y // cell) * grid + int(x // cell)


# ------------------------------------------------------------------------------------------
# a set on disk

def write_set(out_dir: str | Path, images: int, seed: int, start: int = 0) -> Path:
    """Write images ``start .. start + images - 1`` of set ``seed`` as PNG under
    ``out_dir/images/`` and their questions (two per image) as ``out_dir/manifest.parquet``:
    ``id``, ``image_uri`` (relative to the manifest), ``question``, ``answer``, ``type``,
    ``image_id``, ``boxes`` (JSON) and ``target``. The manifest is what
    ``jobs/score_rsvqa.py --input`` reads. Returns the manifest's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for index in range(start, start + images):
        image_id = f"s{seed}-{index:05d}"
        scene = draw_scene(seed, index)
        name = f"images/{image_id}.png"
        Image.fromarray(scene.image).save(out / name, compress_level=1)
        for q in scene_questions(scene, image_id):
            rows.append({**asdict(q), "image_uri": name})
    columns = ("id", "image_uri", "question", "answer", "type", "image_id", "boxes", "target")
    table = pa.table({c: [r[c] for r in rows] for c in columns})
    path = out / MANIFEST
    pq.write_table(table, path)
    log.info("SynthHR: %d images, %d questions (seed %d) under %s", images, len(rows), seed, out)
    return path


def read_boxes(text: str) -> list[Box]:
    """The ``boxes`` column of a manifest row -> boxes."""
    return [Box(**b) for b in json.loads(text)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m synthhr.task",
                                description="write a SynthHR set: 1008 px PNG scenes and a"
                                " manifest of their questions (id, image_uri, question, answer,"
                                " type, boxes)")
    p.add_argument("--out", required=True, help="folder for images/ and manifest.parquet")
    p.add_argument("--images", type=int, required=True, help="scenes (two questions each)")
    p.add_argument("--seed", type=int, required=True, help="set seed (training used 0)")
    p.add_argument("--start", type=int, default=0, help="index of the first scene")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        path = write_set(args.out, args.images, args.seed, start=args.start)
    except ValueError as exc:
        p.error(str(exc))
    print(f"wrote {2 * args.images} questions on {args.images} images: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
