"""The training data: sample ``i`` of a seed is a SynthHR scene and one of its two questions,
a function of ``(seed, i)`` and the pattern share of its step's phase, so a resumed run draws
exactly what an uninterrupted one does; and the per-sample targets the losses read."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from flexattn.answers import ANSWER_SUFFIX
from flexattn.conversation import llava_v1_prompt
from flexattn.tokenizer import PromptTokenizer

from . import task


def question_prompt(question: str) -> str:
    """A SynthHR question the way the RSVQA job asks it."""
    return llava_v1_prompt(f"{question}\n{ANSWER_SUFFIX}")


@dataclass
class Sample:
    image: Image.Image
    question: task.Question
    boxes: tuple[task.Box, ...]


class SceneStream:
    """Training sample ``i`` of ``seed``: a SynthHR scene and one of its two questions (a
    pattern question with probability ``pattern_share``). A background (the costly part of a
    scene) serves ``reuse`` consecutive samples under new boxes, patterns and questions."""

    def __init__(self, seed: int, reuse: int = 4) -> None:
        self.seed, self.reuse = seed, reuse
        self._bg: tuple[int, np.ndarray] | None = None

    def background(self, k: int) -> np.ndarray:
        if self._bg is None or self._bg[0] != k:
            rng = np.random.default_rng([self.seed, 1, k])
            self._bg = (k, np.clip(np.rint(task.background(rng)), 30, 225).astype(np.uint8))
        return self._bg[1]

    def sample(self, i: int, pattern_share: float = 0.5) -> Sample:
        rng = np.random.default_rng([self.seed, 2, i])
        scene = task.draw_boxes(self.background(i // self.reuse).copy(), rng)
        pattern, count = task.scene_questions(scene, f"train-{i}")
        q = pattern if rng.random() < pattern_share else count
        return Sample(Image.fromarray(scene.image), q, scene.boxes)


def lowres_labels(boxes, grid: int) -> torch.Tensor:
    """[grid * grid] class per low-res token: 1 + colour index of a box it overlaps, else 0."""
    labels = np.zeros((grid, grid), dtype=np.int64)
    names = list(task.COLOURS)
    for box in boxes:
        labels[task.box_mask(box, grid)] = 1 + names.index(box.colour)
    return torch.from_numpy(labels.reshape(-1))


def highres_labels(boxes, grid: int) -> torch.Tensor:
    """[grid * grid] per high-res token: 1 + pattern index when the token lies inside a box's
    interior, -100 (ignored) when it only overlaps one, 0 elsewhere."""
    labels = np.zeros((grid, grid), dtype=np.int64)
    cell = task.SIZE / grid
    for box in boxes:
        labels[task.box_mask(box, grid, inset=task.BORDER)] = -100
        a = box.x0 + task.BORDER
        b = box.y0 + task.BORDER
        n = box.side - 2 * task.BORDER
        c0, c1 = math.ceil(a / cell), math.floor((a + n) / cell)  # tokens fully inside
        r0, r1 = math.ceil(b / cell), math.floor((b + n) / cell)
        if c1 > c0 and r1 > r0:
            labels[r0:r1, c0:c1] = 1 + task.PATTERNS.index(box.pattern)
    return torch.from_numpy(labels.reshape(-1))


def asked_boxes(sample: Sample) -> tuple[task.Box, ...]:
    """The boxes a question is about: the named one, or all of them (count)."""
    if sample.question.type == "pattern":
        return (sample.boxes[sample.question.target],)
    return sample.boxes


def attention_target(sample: Sample, grid: int, count_attention: str = "boxes") -> torch.Tensor:
    """[grid * grid] distribution layer s's attention is pulled toward: evenly over the low-res
    tokens of the boxes the question is about; for a count question with ``count_attention``
    "corner", the first low-res token alone (a fixed spot: one cell, one tile), with
    "corner-boxes" half there and half over the boxes (the selection, which keeps what is near
    the map's peak, takes the corner cell, and layer s still reads every box, which counting
    needs)."""
    t = np.zeros((grid, grid))
    corner = sample.question.type == "count" and count_attention != "boxes"
    if not corner or count_attention == "corner-boxes":
        for box in asked_boxes(sample):
            t[task.box_mask(box, grid)] = 1
    if corner:
        t = t / max(t.sum(), 1.0)
        t[0, 0] += 1.0
    return torch.from_numpy(t.reshape(-1) / t.sum()).float()


def colour_slots(samples: list[Sample], answers: list[list[int]], tok: PromptTokenizer,
                 width: int) -> torch.Tensor:
    """[B] the slot of each pattern question's colour word in the teacher-forced sequence of
    ``width`` slots (left padding, the prompt with its image token expanded, the answer but
    its last token); -1 for count questions."""
    slots = torch.full((len(samples),), -1)
    for i, s in enumerate(samples):
        if s.question.type != "pattern":
            continue
        ids = tok.encode_prompt(question_prompt(s.question.question))
        colour = tok.encode_text(s.boxes[s.question.target].colour)
        at = [k for k in range(len(ids)) if ids[k:k + len(colour)] == colour]
        if not at:
            raise ValueError(f"{s.question.question!r}: the colour is not a token run of"
                             " its prompt")
        slots[i] = width - (len(ids) - at[-1] + len(answers[i]) - 1)
    return slots


def oracle_cells(sample: Sample, grid: int = 9) -> torch.Tensor:
    """[grid * grid] bool: the cells put in place of the model's selection: the interiors of
    the boxes the question is about."""
    m = np.zeros((grid, grid), dtype=bool)
    for box in asked_boxes(sample):
        m |= task.box_mask(box, grid, inset=task.BORDER)
    return torch.from_numpy(m.reshape(-1))
