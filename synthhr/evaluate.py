"""Accuracy of a model on SynthHR validation scenes, the way the RSVQA job scores it."""

from __future__ import annotations

from PIL import Image

from flexattn.answers import normalize_answer
from flexattn.generate import LlavaFlexAttn

from . import task
from .data import question_prompt


def evaluate_model(model: LlavaFlexAttn, seed: int, images: int, batch: int = 8,
                   modes: tuple[str, ...] = ("flexattn", "lowres")) -> dict[str, float]:
    """Generate (greedy, the model's own selection) on SynthHR scenes 0..images-1 of ``seed``,
    both questions each: accuracy per question type and mode (``MODE_TYPE``), how often the
    named box's centre cell was among the cells used (``hit``), and the mean selected
    fraction (``frac``)."""
    questions, pictures = [], []
    for index in range(images):
        scene = task.draw_scene(seed, index)
        for q in task.scene_questions(scene, f"eval-{index}"):
            questions.append((q, scene))
            pictures.append(Image.fromarray(scene.image))
    result: dict[str, float] = {}
    for mode in modes:
        right = {"pattern": [], "count": []}
        hits, fracs = [], []
        for k in range(0, len(questions), batch):
            chunk = questions[k:k + batch]
            gens = model.generate(pictures[k:k + batch],
                                  [question_prompt(q.question) for q, _ in chunk],
                                  max_new_tokens=4, mode=mode)
            for (q, scene), g in zip(chunk, gens):
                right[q.type].append(normalize_answer(g.text) == normalize_answer(q.answer))
                if mode == "flexattn":
                    fracs.append(g.hr_selected_frac)
                    if q.type == "pattern":
                        box = scene.boxes[q.target]
                        hits.append(g.hr_cells[task.centre_cell(box)])
        for kind, values in right.items():
            result[f"{mode}_{kind}"] = sum(values) / len(values)
        if mode == "flexattn":
            result["hit"] = sum(hits) / len(hits)
            result["frac"] = sum(fracs) / len(fracs)
    return result
