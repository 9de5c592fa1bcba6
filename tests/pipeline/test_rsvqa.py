"""RSVQA pieces without a cluster: answer normalisation, count bins, both input layouts, scoring
and the summary."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline.rsvqa import (
    ANSWER_SUFFIX,
    compare_form,
    count_bin,
    normalize_answer,
    read_questions,
    score_answers,
    summarize,
    words_to_number,
)


@pytest.mark.parametrize("raw,expected", [
    ("Yes", "yes"), ("yes.", "yes"), ("Yes, there is.", "yes"), ("NO", "no"),
    ("No, there are none", "no"), ("true", "yes"), ("nope", "no"),
    ("Rural.", "rural"), ("  an Urban area ", "urban area"), ("The rural area!", "rural area"),
    ("twelve", "12"), ("Twenty-five", "25"), ("one hundred and five", "105"),
    ("two thousand three hundred", "2300"), ("zero", "0"), ("1,000", "1000"),
    ("12.", "12"), ("2.5", "2.5"), ("between 10m2 and 100m2", "between 10m2 and 100m2"),
    ("more than 1000", "more than 1000"), ("", ""), (None, ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_words_to_number():
    assert words_to_number(["three"]) == 3
    assert words_to_number(["ninety", "nine"]) == 99
    assert words_to_number(["thousand"]) == 1000
    assert words_to_number(["one", "million", "two", "hundred"]) == 1_000_200


@pytest.mark.parametrize("count,label", [
    ("0", "0"), ("1", "between 1 and 10"), ("10", "between 1 and 10"),
    ("11", "between 11 and 100"), ("100", "between 11 and 100"),
    ("101", "between 101 and 1000"), ("1000", "between 101 and 1000"),
    ("1001", "more than 1000"), ("250000", "more than 1000"),
])
def test_count_bins_edges(count, label):
    assert count_bin(count) == label


def test_count_bins_apply_to_count_questions_only_and_both_sides():
    assert count_bin("many") is None and count_bin("2.5") is None
    assert compare_form("seven", "count", True) == "between 1 and 10"
    assert compare_form("7", "count", True) == compare_form("3", "count", True)
    assert compare_form("7", "count", False) == "7"
    assert compare_form("7", "presence", True) == "7"
    assert compare_form("between 1 and 10", "count", True) == "between 1 and 10"


def _write_layout(root, split="LR_split_test"):
    """Original layout with inactive stubs (a question, an answer and an image)."""
    questions = [
        {"id": 0, "img_id": 0, "type": "presence", "question": "Is a road present?",
         "answers_ids": [0], "active": True, "people_id": 1, "date_added": 1.0},
        {"active": False},  # stub outside the split, no other field
        {"id": 2, "img_id": 0, "type": "count", "question": "How many roads?",
         "answers_ids": [1, 2], "active": True},
        {"id": 3, "img_id": 1, "type": "comp", "question": "More water than roads?",
         "answers_ids": [3], "active": True},  # its image is inactive: skipped
        {"id": 4, "img_id": 2, "type": "rural_urban", "question": "Rural or urban?",
         "answers_ids": [4], "active": True},
    ]
    answers = [
        {"id": 0, "question_id": 0, "answer": "yes", "active": True},
        {"id": 1, "active": False},
        {"id": 2, "question_id": 2, "answer": "12", "active": True},
        {"id": 3, "question_id": 3, "answer": "no", "active": True},
        {"id": 4, "question_id": 4, "answer": "urban", "active": True},
    ]
    images = [{"id": 0, "questions_ids": [0, 2], "active": True}, {"id": 1, "active": False},
              {"id": 2, "questions_ids": [4], "active": True}]
    root.mkdir(parents=True, exist_ok=True)
    for key, data in (("questions", questions), ("answers", answers), ("images", images)):
        (root / f"{split}_{key}.json").write_text(json.dumps({key: data}))
    (root / "Images_LR").mkdir(exist_ok=True)


def test_original_layout_skips_stubs_and_inactive_images(tmp_path):
    _write_layout(tmp_path / "rsvqa")
    table = read_questions(str(tmp_path / "rsvqa"))
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["0", "2", "4"]
    assert [r["ground_truth"] for r in rows] == ["yes", "12", "urban"]  # first active answer
    assert [r["question_type"] for r in rows] == ["presence", "count", "rural_urban"]
    assert rows[1]["image_uri"] == str(tmp_path / "rsvqa" / "Images_LR" / "0.tif")
    assert rows[2]["image_id"] == "2"
    assert rows[0]["question"] == f"Is a road present?\n{ANSWER_SUFFIX}"


def test_original_layout_split_choice_and_errors(tmp_path):
    root = tmp_path / "rsvqa"
    _write_layout(root, "LR_split_val")
    _write_layout(root, "LR_split_test")
    with pytest.raises(ValueError, match="--split"):
        read_questions(str(root))
    assert read_questions(str(root), split="LR_split_val").num_rows == 3
    with pytest.raises(ValueError, match="not under"):
        read_questions(str(root), split="LR_split_train")
    other = tmp_path / "elsewhere"
    table = read_questions(str(root), split="LR_split_val", images=str(other))
    assert table.column("image_uri")[0].as_py() == str(other / "0.tif")
    broken = json.loads((root / "LR_split_test_questions.json").read_text())
    del broken["questions"][0]["type"]
    (root / "LR_split_test_questions.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="position 0 lacks"):
        read_questions(str(root), split="LR_split_test")


def test_manifest_layout(tmp_path):
    (tmp_path / "img").mkdir()
    manifest = tmp_path / "qa.csv"
    manifest.write_text("id,image_uri,question,answer,type\n"
                        "q1,img/a.tif,Is there a road?,yes,presence\n"
                        "q2,img/a.tif,How many houses?,4,count\n")
    rows = read_questions(str(manifest)).to_pylist()
    assert [r["id"] for r in rows] == ["q1", "q2"]
    assert rows[1]["ground_truth"] == "4" and rows[1]["question_type"] == "count"
    assert rows[0]["image_uri"] == str(tmp_path / "img" / "a.tif")
    assert rows[1]["question"].endswith(ANSWER_SUFFIX)
    no_answer = tmp_path / "bad.csv"
    no_answer.write_text("id,image_uri,question\nq1,a.tif,Road?\n")
    with pytest.raises(ValueError, match="answer"):
        read_questions(str(no_answer))


def test_scoring_and_summary_by_hand():
    batch = pa.table({
        "question_type": ["presence", "presence", "count", "count", "count", "comp",
                          "rural_urban"],
        "ground_truth": ["yes", "no", "12", "0", "3", "no", "urban"],
        "answer": ["Yes.", "yes", "twelve", "none", "7", None, "Urban"],
        "error": [None, None, None, None, None, "decode failed", None],
    })
    scored = score_answers(batch)
    assert scored.column("correct").to_pylist() == [True, False, True, False, False, False, True]
    assert scored.column("answer_normalized").to_pylist()[2] == "12"
    s = summarize(scored)
    assert list(s["per_type"]) == ["presence", "comp", "count", "rural_urban"]
    assert s["per_type"]["presence"] == {"questions": 2, "correct": 1, "errors": 0,
                                         "accuracy": 0.5}
    assert s["per_type"]["count"]["accuracy"] == pytest.approx(1 / 3)
    assert s["per_type"]["comp"] == {"questions": 1, "correct": 0, "errors": 1, "accuracy": 0.0}
    assert s["average_accuracy"] == pytest.approx((0.5 + 0.0 + 1 / 3 + 1.0) / 4)
    assert s["overall_accuracy"] == pytest.approx(3 / 7)
    # With count bins, 7 and 3 fall in the same bin.
    binned = summarize(score_answers(batch, count_bins=True), count_bins=True)
    assert binned["per_type"]["count"]["correct"] == 2 and binned["count_bins"] is True


def test_original_layout_on_object_storage(s3, tmp_path):
    _write_layout(tmp_path / "local")
    for path in (tmp_path / "local").glob("*.json"):
        s3.put_object(Bucket=s3.bucket, Key=f"rsvqa/{path.name}", Body=path.read_bytes())
    s3.put_object(Bucket=s3.bucket, Key="rsvqa/Images_LR/0.tif", Body=b"II*\x00")
    rows = read_questions(f"s3://{s3.bucket}/rsvqa").to_pylist()
    assert [r["id"] for r in rows] == ["0", "2", "4"]
    assert rows[0]["image_uri"] == f"s3://{s3.bucket}/rsvqa/Images_LR/0.tif"
    assert rows[2]["image_uri"] == f"s3://{s3.bucket}/rsvqa/Images_LR/2.tif"
