"""The committed SynthHR mini model reads what only the high-resolution view shows: fresh pattern
questions (a seed training never used), answered with FlexAttention and with the 336 px view
alone, on CPU."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from flexattn import load_model, synthhr
from flexattn.train import question_prompt

MODEL = Path(__file__).resolve().parents[2] / "models" / "synthhr-mini"
SEED = 77  # training drew from seed 0, its evaluations from 1 and 2026


@pytest.fixture(scope="module")
def mini():
    return load_model(MODEL, device="cpu", dtype="float32")


QUESTIONS = 160  # the model answers about half right: 40 would leave +-0.16 to chance (2 sd)


def answer_fresh(mini) -> tuple[dict[str, float], float, float]:
    """Accuracy per mode on QUESTIONS fresh pattern questions, the share of them whose named
    box's centre cell FlexAttention used, and the seconds it all took."""
    started = time.perf_counter()
    scenes = [synthhr.draw_scene(SEED, i) for i in range(QUESTIONS)]
    questions = [synthhr.scene_questions(s, f"q{i}")[0] for i, s in enumerate(scenes)]
    images = [Image.fromarray(s.image) for s in scenes]
    prompts = [question_prompt(q.question) for q in questions]
    right = {"flexattn": 0, "lowres": 0}
    centre_used = 0
    for mode in right:
        for k in range(0, QUESTIONS, 8):
            gens = mini.generate(images[k:k + 8], prompts[k:k + 8], max_new_tokens=4, mode=mode)
            for q, scene, g in zip(questions[k:k + 8], scenes[k:k + 8], gens):
                right[mode] += g.text.strip().strip(".").lower() == q.answer
                if mode == "flexattn":
                    centre_used += g.hr_cells[synthhr.centre_cell(scene.boxes[scene.target])]
    return ({m: n / QUESTIONS for m, n in right.items()}, centre_used / QUESTIONS,
            time.perf_counter() - started)


@pytest.fixture(scope="module")
def answers(mini):
    return answer_fresh(mini)


def test_committed_mini_reads_patterns_from_the_high_resolution_cells(answers):
    """What the committed model does: it finds the boxes, reads patterns that the 336 px view
    cannot show well above chance and far above the low-res view, on CPU within a minute."""
    accuracy, centre_used, elapsed = answers
    assert centre_used >= 0.95
    assert accuracy["lowres"] <= 0.35, accuracy  # chance is 0.25
    assert accuracy["flexattn"] >= max(0.4, accuracy["lowres"] + 0.15), accuracy
    assert elapsed < 60, f"{elapsed:.1f} s"


@pytest.mark.xfail(strict=True, reason="the committed mini selects every box's cells, not only "
                   "the named one's, and answers about half the pattern questions (README, "
                   "'The trained SynthHR mini'); the target of the SynthHR issue")
def test_committed_mini_meets_the_pattern_target(answers):
    accuracy, _, _ = answers
    assert accuracy["flexattn"] >= 0.9 and accuracy["lowres"] <= 0.5, accuracy


def test_committed_mini_is_the_original_layout_with_its_provenance():
    import json

    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "llava_llama"
    assert (MODEL / config["mm_vision_tower"] / "model.safetensors").is_file()
    provenance = json.loads((MODEL / "training.json").read_text())
    assert provenance["command"].startswith("python -m flexattn.train")
    assert provenance["recipe"]["seed"] == 0 and len(provenance["commit"]) == 40
    assert provenance["train_seconds"] > 0 and provenance["steps"] == provenance["recipe"]["steps"]
    # the selection threshold was chosen on validation scenes (python -m flexattn.calibrate)
    calibration = provenance["calibration"]
    assert calibration["command"].startswith("python -m flexattn.calibrate")
    assert float(config["extra"]["threshold"]) == calibration["chosen"]
    total = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert total <= 40 * 2**20
