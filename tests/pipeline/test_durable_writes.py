"""Durable writes: answers reach Parquet while decode and the model still hold every CPU, and
the write buffer's flush rules (rows, time, first rows at once, retried writes taken once)."""

from __future__ import annotations

import os
import sys
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
def test_answers_are_written_while_a_long_decode_block_is_still_running(
        ray_local, demo_model, tmp_path, monkeypatch):
    """On 2 CPUs one decode task holds a CPU for its whole listing block and the model actor
    holds the other. Row 150 (in the second listing block, decoded in one task) is a named
    pipe, so that block's decode task cannot end until the test writes to it: the test only
    does so once answers from that block are in a Parquet file (or after 150 s, and then
    fails). Before the fix the write had no CPU budget until decode finished: no file came."""
    monkeypatch.setattr("pipeline.inputs.LISTING_BLOCK_ROWS", 100)  # 200 inputs -> 2 blocks
    images = tmp_path / "img"
    images.mkdir()
    noise_image(64, 48, seed=1).save(images / "a.png")
    fifo = images / "slow.png"
    os.mkfifo(fifo)
    uris = ["img/slow.png" if i == 150 else "img/a.png" for i in range(200)]
    ids = [f"r{i:03d}" for i in range(200)]
    pq.write_table(pa.table({"id": ids, "image_uri": uris}), tmp_path / "manifest.parquet")
    out = tmp_path / "out"
    config = JobConfig(input=str(tmp_path / "manifest.parquet"), output=str(out),
                       model=str(demo_model), max_new_tokens=1, batch_size=4,
                       memory_per_actor_gb=0.5, flush_seconds=5)
    result: dict = {}
    job = threading.Thread(target=lambda: result.setdefault("summary", run(config)))
    job.start()
    start, seen_s = time.monotonic(), None
    try:
        while time.monotonic() - start < 150 and job.is_alive() and seen_s is None:
            time.sleep(0.5)
            for path in out.glob("part-*.parquet"):
                if any(i >= "r100" for i in pq.read_table(path).column("id").to_pylist()):
                    seen_s = time.monotonic() - start
    finally:
        with open(fifo, "wb") as f:  # lets the blocked decode task go on
            f.write((images / "a.png").read_bytes())
        job.join(timeout=300)
    assert seen_s is not None, "no answer of the long decode block was written while it ran"
    summary = result["summary"]
    assert (summary.rows_listed, summary.rows_written) == (200, 200)
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == ids  # each input exactly once
    errors = {r["id"]: r["error_stage"] for r in table.to_pylist() if r["error"]}
    assert set(errors) <= {"r150"}  # the pipe, if its reader could not seek it


def _manifest_shards(folder, ids_per_shard: list[list[str]], image: str) -> None:
    folder.mkdir()
    for n, ids in enumerate(ids_per_shard):
        pq.write_table(pa.table({"id": ids, "image_uri": [image] * len(ids)}),
                       folder / f"part-{n}.parquet")


@pytest.mark.slow
def test_manifest_is_listed_in_the_cluster_and_resumed_there(ray_local, demo_model, tmp_path,
                                                            monkeypatch):
    """A manifest of more than one listing block never passes through the driver: listing it
    there fails this test. Resume
    and the counts of the summary come from the read tasks; ids repeated across shards fail
    the run after it (each answered once per shard)."""
    def no_driver_listing(*args, **kwargs):
        raise AssertionError("the driver listed the manifest")

    monkeypatch.setattr(sys.modules["pipeline.run"], "put_inputs", no_driver_listing)
    monkeypatch.setattr("pipeline.inputs.LISTING_BLOCK_ROWS", 4)  # 9 rows: a large manifest
    noise_image(64, 48, seed=2).save(tmp_path / "a.png")
    _manifest_shards(tmp_path / "m", [[f"s0-{i}" for i in range(5)],
                                      [f"s1-{i}" for i in range(4)]], str(tmp_path / "a.png"))
    out = tmp_path / "out"
    base = {"input": str(tmp_path / "m"), "output": str(out), "model": str(demo_model),
            "max_new_tokens": 1, "batch_size": 2, "memory_per_actor_gb": 0.5}
    first = run(JobConfig(**base, limit=None, decode_in_actors=True))
    assert (first.rows_listed, first.rows_skipped, first.rows_written) == (9, 0, 9)
    pq.write_table(pa.table({"id": ["s2-0", "s2-1"], "image_uri": [str(tmp_path / "a.png")] * 2}),
                   tmp_path / "m" / "part-2.parquet")
    second = run(JobConfig(**base))
    assert (second.rows_listed, second.rows_skipped, second.rows_written) == (11, 9, 2)
    ids = pq.read_table(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 11  # each input exactly once
    pq.write_table(pa.table({"id": ["s0-1", "new"], "image_uri": [str(tmp_path / "a.png")] * 2}),
                   tmp_path / "m" / "part-3.parquet")
    with pytest.raises(ValueError, match="1 ids appear in more than one manifest file"):
        run(JobConfig(**base))
