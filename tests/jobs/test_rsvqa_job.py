"""jobs/score_rsvqa.py on a real local Ray with the tiny demo model.

The tiny model answers gibberish, so the scoring is checked by accounting: a manifest run
first; then the same questions in the original RSVQA layout, where some ground truths are
the first run's answers (greedy and batch size 1, so the model repeats them), which gives a
mix of right and wrong answers; the summary must equal what the written rows give by hand.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.score_rsvqa import main, parse_config
from pipeline.rsvqa import ANSWER_SUFFIX
from tests.flexattn.test_viz import assert_cells_drawn

# (question id, image id, type, question, answer); ids 3 and 9 are inactive stubs.
QUESTIONS = [
    (0, 0, "presence", "Is a road present?", "yes"),
    (1, 0, "comp", "Are there more buildings than roads?", "no"),
    (2, 0, "count", "How many buildings are there?", "7"),
    (4, 2, "rural_urban", "Is it a rural or an urban area?", "rural"),
    (5, 2, "presence", "Is there a water area?", "no"),
    (6, 2, "area", "What is the area covered by buildings?", "between 10m2 and 100m2"),
    (7, 2, "count", "How many roads are there?", "12"),
    (8, 0, "area", "What is the area covered by roads?", "0m2"),
]
RIGGED = {0, 2, 5, 6}  # truths replaced by the first run's answers
SIZES = {0: (256, 256), 2: (300, 200)}


def _images(folder):
    folder.mkdir(parents=True)
    for img_id, (w, h) in SIZES.items():
        rng = np.random.default_rng(img_id)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            folder / f"{img_id}.tif", compression="tiff_adobe_deflate")


def _write_original_layout(root, truths: dict[int, str]) -> None:
    questions, answers = [], []
    by_id = {q[0]: q for q in QUESTIONS}
    for qid in range(10):
        if qid not in by_id:
            questions.append({"active": False})  # a stub: no id, no fields
            answers.append({"id": qid, "active": False})
            continue
        _, img_id, qtype, text, _ = by_id[qid]
        questions.append({"id": qid, "img_id": img_id, "type": qtype, "question": text,
                          "answers_ids": [qid], "people_id": 1, "date_added": 0.5,
                          "active": True})
        answers.append({"id": qid, "question_id": qid, "answer": truths[qid], "active": True,
                        "people_id": 1, "date_added": 0.5})
    images = [{"id": 0, "questions_ids": [0, 1, 2, 8], "active": True},
              {"id": 1, "active": False},
              {"id": 2, "questions_ids": [4, 5, 6, 7], "active": True}]
    for key, data in (("questions", questions), ("answers", answers), ("images", images)):
        (root / f"LR_split_test_{key}.json").write_text(json.dumps({key: data}))


def _by_hand(rows) -> dict:
    per = defaultdict(list)
    for r in rows:
        per[r["question_type"]].append(bool(r["correct"]))
    acc = {t: sum(v) / len(v) for t, v in per.items()}
    return {"per_type": acc, "average": sum(acc.values()) / len(acc),
            "overall": sum(sum(v) for v in per.values()) / len(rows)}


def _check_summary(out, rows):
    summary = json.loads((out / "_rsvqa_scores.json").read_text())
    hand = _by_hand(rows)
    assert {t: p["accuracy"] for t, p in summary["per_type"].items()} == pytest.approx(
        hand["per_type"])
    assert summary["average_accuracy"] == pytest.approx(hand["average"])
    assert summary["overall_accuracy"] == pytest.approx(hand["overall"])
    assert summary["questions"] == len(rows)
    return summary


def test_rsvqa_job_manifest_then_original_layout(ray_local, demo_model, tmp_path, capsys):
    root = tmp_path / "RSVQA_LR"
    _images(root / "Images_LR")
    common = ["--model", str(demo_model), "--max-new-tokens", "3", "--batch-size", "1",
              "--memory-per-actor-gb", "0.5"]

    # 1. A plain manifest (relative image paths).
    manifest = tmp_path / "questions.csv"
    manifest.write_text("id,image_uri,question,answer,type\n" + "".join(
        f"{qid},RSVQA_LR/Images_LR/{img}.tif,{text},{truth},{qtype}\n"
        for qid, img, qtype, text, truth in QUESTIONS))
    out1 = tmp_path / "out_manifest"
    assert main(["--input", str(manifest), "--output", str(out1), *common]) == 0
    rows1 = pq.read_table(out1).to_pylist()
    assert sorted(int(r["id"]) for r in rows1) == [q[0] for q in QUESTIONS]
    assert all(r["error"] is None and r["answer"] is not None for r in rows1)
    for r in rows1:
        qid, _, qtype, text, truth = next(q for q in QUESTIONS if str(q[0]) == r["id"])
        assert (r["question_type"], r["ground_truth"]) == (qtype, truth)
        assert r["prompt"] == f"{text}\n{ANSWER_SUFFIX}"
        assert r["correct"] == (r["answer_normalized"] == r["truth_normalized"])
    _check_summary(out1, rows1)
    first = {int(r["id"]): r["answer"] for r in rows1}

    # 2. The original layout, with some truths set to the answers the model gave.
    truths = {q[0]: (first[q[0]] if q[0] in RIGGED else q[4]) for q in QUESTIONS}
    _write_original_layout(root, truths)
    out2 = tmp_path / "out_original"
    capsys.readouterr()
    assert main(["--input", str(root), "--output", str(out2), "--count-bins",
                 "--save-overlays", "2", *common]) == 0
    printed = capsys.readouterr().out
    rows2 = pq.read_table(out2).to_pylist()
    assert sorted(int(r["id"]) for r in rows2) == [q[0] for q in QUESTIONS]  # stubs skipped
    by_id = {int(r["id"]): r for r in rows2}
    assert by_id[4]["image_id"] == "2" and by_id[4]["source_uri"].endswith("Images_LR/2.tif")
    assert {qid: r["answer"] for qid, r in by_id.items()} == first  # the model repeats itself
    assert {qid for qid, r in by_id.items() if r["correct"]} == RIGGED
    summary = _check_summary(out2, rows2)
    assert summary["count_bins"] is True
    assert list(summary["per_type"]) == ["presence", "comp", "count", "area", "rural_urban"]
    assert summary["per_type"]["presence"]["accuracy"] == 1.0  # questions 0 and 5
    assert summary["per_type"]["count"]["accuracy"] == 0.5
    assert summary["overall_accuracy"] == pytest.approx(4 / 8)
    assert summary["average_accuracy"] == pytest.approx((1 + 0 + 0.5 + 0.5 + 0) / 5)
    assert re.search(r"overall accuracy \(%\) +50\.00  \(4/8\)", printed)
    assert "| **average accuracy** | | | | 40.00 |" in (out2 / "_rsvqa_scores.md").read_text()

    # 3. Overlays of the first two rows by id ("0", "1"): image 0 at 256x256.
    for qid in (0, 1):
        png = Image.open(out2 / "_overlays" / f"{qid}.png")
        assert png.format == "PNG" and png.size == SIZES[0]
        selected, unselected = assert_cells_drawn(png.convert("RGB"), by_id[qid]["hr_cells"],
                                                  *SIZES[0])
        assert selected >= 1 and unselected >= 1


def test_rsvqa_flags():
    config, args = parse_config(["--count-bins", "--split", "LR_split_val"])
    assert config.task.name == "rsvqa" and config.task.finalize.keywords["count_bins"] is True
    assert args.split == "LR_split_val" and config.max_new_tokens == 8


def test_rsvqa_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "no *_questions.json" in capsys.readouterr().err
