"""Write stage, resume and summary, called directly (local disk and a real moto S3)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from pipeline.columns import OUTPUT_SCHEMA, MissingColumnsError, conform, output_schema
from pipeline.resume import (
    DoneKeys,
    done_keys,
    drop_done_blocks,
    list_output_files,
    pending,
    prepare_output,
    read_output,
)
from pipeline.summary import RunSummary
from pipeline.write import ParquetSink, batch_stats, merge_stats


def _rows(ids, task="caption", errors=None):
    n = len(ids)
    errors = errors or [None] * n
    return pa.table({
        "id": ids,
        "source_uri": [f"/in/{i}" for i in ids],
        "task": [task] * n,
        "answer": [None if e else f"answer {i}" for i, e in zip(ids, errors)],
        "model": ["tiny"] * n,
        "hr_selected_frac": [None if e else 0.25 for e in errors],
        "hr_cells": [[True] * 81] * n,
        "error": [e and f"Boom: {e}" for e in errors],
        "error_stage": errors,
        "image_junk": [1] * n,  # pipeline-only column: must not be written
    })


def test_conform_casts_orders_and_fills_nulls():
    out = conform(_rows(["a"]), OUTPUT_SCHEMA)
    assert out.schema == OUTPUT_SCHEMA
    assert out.column("width").to_pylist() == [None]
    with pytest.raises(MissingColumnsError, match="'write'.*'source_uri'"):
        conform(pa.table({"id": ["a"]}), OUTPUT_SCHEMA)
    with pytest.raises(ValueError, match="clashes"):
        output_schema([pa.field("answer", pa.string())])


def test_sink_writes_whole_files_with_deterministic_names(tmp_path):
    sink = ParquetSink(str(tmp_path / "out"), OUTPUT_SCHEMA)
    sink.on_write_start()
    first = sink.write([_rows(["a", "b"]), _rows(["c"], errors=["decode"])], ctx=None)
    again = sink.write([_rows(["a", "b"]), _rows(["c"], errors=["decode"])], ctx=None)
    assert first["files"] == again["files"]  # a retried task rewrites, never duplicates
    assert [p.name for p in (tmp_path / "out").iterdir()] == [first["files"][0].split("/")[-1]]
    table = pq.read_table(tmp_path / "out")
    assert table.schema == OUTPUT_SCHEMA
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    assert first["rows"] == 3 and first["rows_ok"] == 2
    assert first["errors_by_stage"] == {"decode": 1}
    assert first["selected_frac_sum"] == pytest.approx(0.5)


def test_sink_on_s3_reads_back_with_pyarrow(s3, pipeline_env):
    out = f"s3://{s3.bucket}/run1"
    sink = ParquetSink(out, OUTPUT_SCHEMA)
    sink.on_write_start()
    stats = sink.write([_rows(["x", "y"])], ctx=None)
    assert stats["files"][0].startswith(f"s3://{s3.bucket}/run1/part-")
    fs = pyarrow.fs.S3FileSystem(endpoint_override=pipeline_env["AWS_ENDPOINT_URL"],
                                 access_key="testing", secret_key="testing", region="us-east-1")
    table = pq.read_table(f"{s3.bucket}/run1", filesystem=fs)
    assert sorted(table.column("id").to_pylist()) == ["x", "y"]
    assert done_keys(out, ("id",), "caption").column("id").to_pylist() in (["x", "y"], ["y", "x"])


def test_half_written_and_foreign_files_are_not_counted(tmp_path):
    out = tmp_path / "out"
    ParquetSink(str(out), OUTPUT_SCHEMA).write([_rows(["a"])], ctx=None)
    (out / ".part-dead.parquet.1234abcd.tmp").write_bytes(b"PAR1 half a file")
    (out / "_summary.json").write_text("{}")
    assert pq.read_table(out).num_rows == 1  # pyarrow skips '.' and '_' names too
    (out / "notes.txt").write_text("keep me")
    assert len(list_output_files(str(out))) == 1
    assert read_output(str(out), ["id"]).column("id").to_pylist() == ["a"]
    prepare_output(str(out), overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["_summary.json", "notes.txt", list_output_files(str(out))[0].split("/")[-1]]
    )
    prepare_output(str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_corrupt_committed_file_is_an_explicit_error(tmp_path):
    (tmp_path / "part-bad.parquet").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="part-bad.parquet is not readable Parquet"):
        done_keys(str(tmp_path), ("id",), "caption")


def test_resume_anti_join_and_task_guard(tmp_path):
    out = str(tmp_path / "out")
    ParquetSink(out, OUTPUT_SCHEMA).write([_rows(["a", "c"], errors=[None, "read"])], ctx=None)
    done = done_keys(out, ("id",), "caption")
    inputs = pa.table({"id": ["a", "b", "c", "d"], "source_uri": ["1", "2", "3", "4"]})
    assert pending(inputs, done).column("id").to_pylist() == ["b", "d"]
    with pytest.raises(ValueError, match="--output .* holds rows of task"):
        done_keys(out, ("id",), "ocr")
    assert done_keys(str(tmp_path / "nothing"), ("id",), "caption").num_rows == 0


def test_pending_on_two_keys():
    done = pa.table({"id": ["doc", "doc"], "page": pa.array([0, 2], pa.int32())})
    rows = pa.table({"id": ["doc"] * 3 + ["other"], "page": pa.array([0, 1, 2, 0], pa.int32())})
    left = pending(rows, done, ("id", "page"))
    assert sorted(zip(left.column("id").to_pylist(), left.column("page").to_pylist())) == [
        ("doc", 1), ("other", 0)
    ]


def test_summary_from_stats_table_and_json(tmp_path):
    stats = merge_stats([
        batch_stats(conform(_rows(["a", "b"]), OUTPUT_SCHEMA)) | {"files": ["f1"]},
        batch_stats(conform(_rows(["c"], errors=["decode"]), OUTPUT_SCHEMA)) | {"files": ["f2"]},
        {},
    ])
    summary = RunSummary.from_stats(stats, elapsed_s=2.0, task="caption", model="tiny",
                                    output=str(tmp_path), rows_listed=5, rows_skipped=2)
    assert (summary.rows_written, summary.rows_ok, summary.errors) == (3, 2, 1)
    assert summary.images_per_s == pytest.approx(1.5)
    assert summary.mean_selected_frac == pytest.approx(0.25)
    assert summary.files_written == 2
    text = summary.format_table()
    assert "errors                     1 (decode=1)" in text
    assert "skipped (already written)  2" in text
    uri = summary.write()
    data = json.loads((tmp_path / "_summary.json").read_text())
    assert uri == str(tmp_path / "_summary.json")
    assert data["errors_by_stage"] == {"decode": 1} and data["rows_written"] == 3


def test_done_keys_are_read_and_filtered_in_the_cluster(ray_local, tmp_path):
    import ray

    out = str(tmp_path / "out")
    ParquetSink(out, OUTPUT_SCHEMA).write([_rows(["a", "c"])], ctx=None)
    ParquetSink(out, OUTPUT_SCHEMA).write([_rows(["e"], errors=["read"])], ctx=None)
    done = DoneKeys.collect(out, ("id",), "caption")
    assert done.rows == 3 and sorted(done.table().column("id").to_pylist()) == ["a", "c", "e"]
    blocks = [ray.put(pa.table({"id": ids, "source_uri": ids}))
              for ids in (["a", "b"], ["c", "e"], ["f", "g", "a"])]
    kept, left = drop_done_blocks(blocks, 7, done)
    assert left == 3  # b, f, g
    assert [ray.get(b).column("id").to_pylist() for b in kept] == [["b"], ["f", "g"]]
    with pytest.raises(ValueError, match="--output .* holds rows of task"):
        DoneKeys.collect(out, ("id",), "ocr")
    nothing = DoneKeys.collect(str(tmp_path / "nothing"), ("id",), "caption")
    assert (nothing.rows, nothing.ref, nothing.table().num_rows) == (0, None, 0)
    assert drop_done_blocks(blocks, 7, nothing) == (blocks, 7)
    (tmp_path / "out" / "part-bad.parquet").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="part-bad.parquet is not readable Parquet"):
        DoneKeys.collect(out, ("id",), "caption")


def test_rows_per_file_is_the_sinks_write_bundle():
    assert ParquetSink("out", OUTPUT_SCHEMA, rows_per_file=500).min_rows_per_write == 500
    assert ParquetSink("out", OUTPUT_SCHEMA).min_rows_per_write is None
    with pytest.raises(ValueError, match="--rows-per-file"):
        ParquetSink("out", OUTPUT_SCHEMA, rows_per_file=0)


def test_failure_reason_for_the_exit_status(tmp_path):
    def summary(written, errors):
        return RunSummary(task="caption", model="m", output=str(tmp_path), rows_listed=10,
                          rows_skipped=0, rows_written=written, rows_ok=written - errors,
                          errors_by_stage={"decode": errors} if errors else {})

    assert summary(0, 0).failure() is None  # nothing to do is not a failure
    assert summary(4, 3).failure() is None  # the default tolerates any share but all
    assert summary(4, 4).failure() == ("all 4 rows written by this run are errors"
                                       " (decode=4)")
    assert summary(4, 1).failure(0.25) is None
    assert summary(4, 2).failure(0.25) == (
        "2 of 4 rows written by this run are errors (50.0%; decode=2), above"
        " --max-error-fraction 0.25")
