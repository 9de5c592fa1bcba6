"""Durable writes: answers reach Parquet while decode and the model still hold every CPU, and
the write buffer's flush rules (rows, time, first rows at once, retried writes taken once)."""

from __future__ import annotations

import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.columns import OUTPUT_SCHEMA, conform
from pipeline.run import JobConfig, run
from pipeline.write import RowBuffer
from tests.helpers import noise_image


def _answers(ids: list[str]) -> pa.Table:
    return conform(pa.table({"id": ids, "source_uri": ids, "task": ["caption"] * len(ids),
                             "answer": [f"about {i}" for i in ids]}), OUTPUT_SCHEMA)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _files(out) -> dict[str, int]:
    return {p.name: pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet")}


def test_buffer_writes_first_rows_at_once_then_by_rows_or_age(tmp_path):
    out, clock = tmp_path / "out", Clock()
    buf = RowBuffer(str(out), ("id",), rows_per_file=5, flush_seconds=60, clock=clock)
    buf.add(_answers(["a", "b"]), "t1")
    assert sorted(_files(out).values()) == [2]  # the first rows go to disk at once
    clock.now = 10
    assert buf.add(_answers(["c", "d"]), "t2") == 2 and len(_files(out)) == 1
    assert buf.add(_answers(["c", "d"]), "t2") == 2  # a retried write task: taken once
    clock.now = 69.9
    assert not buf.tick() and len(_files(out)) == 1
    clock.now = 70  # the oldest buffered row ("c", at 10 s) has waited 60 s
    assert buf.tick() and sorted(_files(out).values()) == [2, 2]
    assert buf.add(_answers(["e", "f", "g"]), "t3") == 3
    assert buf.add(_answers(["h", "i"]), "t4") == 0  # 5 rows: a file
    assert sorted(_files(out).values()) == [2, 2, 5]
    buf.add(_answers(["j"]), "t5")
    stats = buf.close()
    assert sorted(_files(out).values()) == [1, 2, 2, 5]
    assert stats["rows"] == 10 and len(stats["files"]) == 4
    ids = pq.read_table(out).column("id").to_pylist()
    assert sorted(ids) == list("abcdefghij")  # each row exactly once
    with pytest.raises(RuntimeError, match="closed"):
        buf.add(_answers(["k"]), "t6")


def test_buffer_keeps_rows_when_a_write_fails(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    buf = RowBuffer(str(blocker), ("id",), rows_per_file=2, flush_seconds=60, clock=Clock())
    with pytest.raises(Exception):  # noqa: B017 - the storage error itself
        buf.add(_answers(["a", "b"]), "t1")
    assert buf.rows == 2  # still held, not dropped
    blocker.unlink()
    assert buf.close()["rows"] == 2
    assert sorted(pq.read_table(blocker).column("id").to_pylist()) == ["a", "b"]


@pytest.mark.slow
def test_first_file_is_written_while_a_long_decode_block_is_still_running(
        ray_local, demo_model, tmp_path, monkeypatch):
    """On 2 CPUs one decode task holds a CPU for its whole listing block and the model actor
    holds the other. Row 80 of the first block is a named pipe, so that block's decode task
    cannot end until the test writes to it: the test only does so once a Parquet file is
    there (or after 120 s, and then fails). Before the fix the write had no CPU budget until
    decode finished, so no file came."""
    monkeypatch.setattr("pipeline.inputs.LISTING_BLOCK_ROWS", 100)  # 150 inputs -> 2 blocks
    images = tmp_path / "img"
    images.mkdir()
    noise_image(64, 48, seed=1).save(images / "a.png")
    fifo = images / "slow.png"
    os.mkfifo(fifo)
    uris = ["img/slow.png" if i == 80 else "img/a.png" for i in range(150)]
    ids = [f"r{i:03d}" for i in range(150)]
    pq.write_table(pa.table({"id": ids, "image_uri": uris}), tmp_path / "manifest.parquet")
    out = tmp_path / "out"
    config = JobConfig(input=str(tmp_path / "manifest.parquet"), output=str(out),
                       model=str(demo_model), max_new_tokens=1, batch_size=4,
                       memory_per_actor_gb=0.5)
    result: dict = {}
    job = threading.Thread(target=lambda: result.setdefault("summary", run(config)))
    job.start()
    start, first_file_s = time.monotonic(), None
    try:
        while time.monotonic() - start < 120 and job.is_alive():
            if list(out.glob("part-*.parquet")):
                first_file_s = time.monotonic() - start
                break
            time.sleep(0.5)
    finally:
        with open(fifo, "wb") as f:  # lets the blocked decode task go on
            f.write((images / "a.png").read_bytes())
        job.join(timeout=300)
    assert first_file_s is not None, "no Parquet file while the first decode block ran"
    summary = result["summary"]
    assert summary.rows_written == 150
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == ids  # each input exactly once
    errors = {r["id"]: r["error_stage"] for r in table.to_pylist() if r["error"]}
    assert set(errors) <= {"r080"}  # the pipe, if its reader could not seek it
