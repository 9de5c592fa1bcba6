"""Issue 5.1: a corpus of awkward files mixed with good ones, in one caption job and one OCR
job on a real local Ray with the real tiny model. Every input gives exactly one row (one per
page for documents): an answer, or an error naming the stage and the cause; the job finishes
and the summary counts them."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq

from pipeline.inputs import InputConfig, list_inputs
from pipeline.ocr import ocr_task
from pipeline.predict import EMPTY_QUESTION_ERROR
from pipeline.run import JobConfig, run
from tests.reliability.corpus import (
    NON_UTF8_ID,
    Expect,
    write_document_corpus,
    write_image_corpus,
)

MISSING_ID = "missing_object"
EMPTY_QUESTION_ID = "empty_question"


def _job(tmp_path, demo_model, **kw) -> JobConfig:
    base = {"output": str(tmp_path / "out"), "model": str(demo_model), "max_new_tokens": 2,
            "batch_size": 4, "decode_rows_per_task": 4, "memory_per_actor_gb": 0.5}
    return JobConfig(**(base | kw))


def _check_rows(rows: list[dict], expect: dict[str, Expect]) -> None:
    for row in rows:
        e = expect[row["id"]]
        if e.stage is None:
            assert row["error"] is None and row["error_stage"] is None, (row["id"], row["error"])
            assert isinstance(row["answer"], str) and row["generated_tokens"] >= 1, row["id"]
            assert len(row["hr_cells"]) == 81
            if e.size is not None and row.get("page") in (None, 0) and row["id"] != "report.pdf":
                assert (row["width"], row["height"]) == e.size, row["id"]
        else:
            assert row["error_stage"] == e.stage, (row["id"], row["error_stage"], row["error"])
            assert e.cause in row["error"], (row["id"], row["error"])
            assert row["answer"] is None


def _print_table(title: str, rows: list[dict], expect: dict[str, Expect]) -> None:
    print(f"\n{title}\n| file kind | id | outcome |\n|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["id"], r.get("page") or 0)):
        page = f" p{row['page']}" if row.get("page") is not None else ""
        outcome = (f"answer ({row['width']}x{row['height']})" if row["error"] is None
                   else f"{row['error_stage']}: {row['error']}")
        print(f"| {expect[row['id']].kind} | `{row['id']}`{page} | {outcome} |")


def test_caption_job_over_the_bad_input_corpus(ray_local, s3, demo_model, tmp_path):
    expect = write_image_corpus(tmp_path / "corpus")
    # The manifest a user would write: the listed folder (the non-UTF-8 name comes out of the
    # listing as an escaped id and a percent-encoded file:// URI), plus a row naming an object
    # that does not exist and a row whose question is empty.
    listed = list_inputs(InputConfig(str(tmp_path / "corpus"))).to_pylist()
    assert {r["id"] for r in listed} == set(expect)
    assert next(r for r in listed if r["id"] == NON_UTF8_ID)["source_uri"].endswith(
        "/caf%E9_latin1.jpg")
    good_uri = next(r["source_uri"] for r in listed if r["id"] == "good_scene.jpg")
    rows = [{"id": r["id"], "image_uri": r["source_uri"]} for r in listed]
    rows.append({"id": MISSING_ID, "image_uri": f"s3://{s3.bucket}/tiles/never_uploaded.jpg"})
    rows.append({"id": EMPTY_QUESTION_ID, "image_uri": good_uri, "question": ""})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expect[MISSING_ID] = Expect("manifest row naming a missing object", "read",
                                f"FileNotFoundError: {s3.bucket}/tiles/never_uploaded.jpg")
    expect[EMPTY_QUESTION_ID] = Expect("empty question", "predict", EMPTY_QUESTION_ERROR)
    assert len(expect) == 21

    summary = run(_job(tmp_path, demo_model, input=str(manifest)))

    table = pq.read_table(tmp_path / "out")
    out = table.to_pylist()
    ids = [r["id"] for r in out]
    assert sorted(ids) == sorted(expect) and len(ids) == len(set(ids))  # each exactly once
    _check_rows(out, expect)
    errors = Counter(e.stage for e in expect.values() if e.stage)
    assert errors == {"decode": 6, "read": 1, "predict": 1}
    assert (summary.rows_listed, summary.rows_written, summary.rows_skipped) == (21, 21, 0)
    assert summary.rows_ok == 13 and summary.errors_by_stage == dict(sorted(errors.items()))
    on_disk = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert on_disk["errors_by_stage"] == {"decode": 6, "predict": 1, "read": 1}
    assert on_disk["rows_ok"] == 13
    _print_table("caption job", out, expect)


def test_ocr_job_over_the_document_corpus(ray_local, demo_model, tmp_path):
    expect = write_document_corpus(tmp_path / "docs")
    summary = run(_job(tmp_path, demo_model, input=str(tmp_path / "docs"), task=ocr_task(),
                       decode_rows_per_task=1))

    out = pq.read_table(tmp_path / "out").to_pylist()
    keys = sorted((r["id"], r["page"] if r["page"] is not None else -1) for r in out)
    assert keys == [("corrupt.pdf", -1), ("cut.pdf", -1), ("locked.pdf", -1),
                    ("report.pdf", 0), ("report.pdf", 1), ("scan.png", 0)]
    _check_rows(out, expect)
    assert (summary.rows_listed, summary.rows_written) == (5, 6)
    assert summary.rows_ok == 3 and summary.errors_by_stage == {"decode": 3}
    _print_table("OCR job", out, expect)
