"""Stage 4, write: Parquet files with the stable output schema, committed atomically.

`ParquetSink` is a Ray Data `Datasink` (`ds.write_datasink(sink)`). Each write task conforms
its blocks to the schema. Files are named after a hash of the keys they hold, so a retried
write rewrites the same file instead of adding a duplicate.

- Unbuffered (the default for a user's own `write_datasink`): each write task writes its
  blocks as one file; `rows_per_file` makes Ray Data bundle at least that many rows into each
  write, with no bound on how long they wait for it.
- Buffered (`pipeline.run`, after `sink.start()`): writes hand their rows to one
  `RowBuffer` actor of the job, which writes a file once it holds `rows_per_file` rows or its
  oldest row has waited `flush_seconds`, and writes the very first rows at once. So answers
  are durable within `flush_seconds` of being answered, however slowly they come, and files
  still hold up to `rows_per_file` rows when they come fast. A kill loses at most the rows in
  the buffer (see docs/DESIGN.md, "Durable writes"). The actor asks for no CPU, as the job's
  writer actor does (`pipeline.run.WriteStage`, which calls `write` the way Ray Data's write
  tasks would): a write never waits for a CPU that decode or the model holds.

- local paths: written to a hidden `.part-*.tmp` file, then renamed into place;
- object storage: uploaded straight to the final key (an object only appears once its
  upload completes, so a killed writer leaves nothing behind).

`file_metadata`, when given, makes each file's schema metadata from the rows it holds (the
GeoParquet `geo` key of the caption job: `pipeline.geo.geoparquet_metadata`).

Readers (resume, pyarrow, Ray) skip names starting with `.` or `_`, so only whole files count.
Each task returns its counts; the driver aggregates them into the run summary.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink
from ray.data.datasource.datasink import WriteResult

from pipeline.columns import conform, require_columns
from pipeline.storage import is_local, open_fs, retrying, to_uri

logger = logging.getLogger(__name__)

STAGE = "write"
PART_PREFIX = "part-"
PARQUET_SUFFIX = ".parquet"
TMP_SUFFIX = ".tmp"
# --flush-seconds: the longest an answered row waits in the write buffer. 50 s, not 60: with
# the batches on their way from the actors, what a kill loses stays within a minute of answers.
DEFAULT_FLUSH_SECONDS = 50.0


def part_name(table: pa.Table, key_columns: tuple[str, ...]) -> str:
    """Deterministic file name from the keys in `table` (same rows -> same file)."""
    digest = hashlib.sha256()
    for row in zip(*(table.column(c).to_pylist() for c in key_columns)):
        digest.update(repr(row).encode())
        digest.update(b"\0")
    return f"{PART_PREFIX}{digest.hexdigest()[:24]}{PARQUET_SUFFIX}"


def write_table(table: pa.Table, output: str, name: str) -> str:
    """Write `table` to `output/name` so that the final name only ever holds a whole file;
    transient storage errors are retried (`pipeline.storage.retrying`)."""
    fs, root = open_fs(output)
    final = posixpath.join(root, name)

    def write() -> None:
        if is_local(fs):
            fs.makedirs(root, exist_ok=True)
            tmp = posixpath.join(root, f".{name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
            try:
                with fs.open(tmp, "wb") as f:
                    pq.write_table(table, f)
                fs.mv(tmp, final)
            finally:
                if fs.exists(tmp):
                    fs.rm(tmp)
        else:
            with fs.open(final, "wb") as f:
                pq.write_table(table, f)

    retrying(f"write {to_uri(fs, final)}", write)
    return to_uri(fs, final)


def batch_stats(table: pa.Table) -> dict[str, Any]:
    """Counts for the run summary (merged across write tasks by `merge_stats`)."""
    stages = pc.value_counts(table.column("error_stage").drop_null()).to_pylist()
    ok = table.filter(pc.is_null(table.column("error")))
    frac = ok.column("hr_selected_frac").drop_null()
    return {
        "rows": table.num_rows,
        "rows_ok": ok.num_rows,
        "errors_by_stage": {v["values"]: v["counts"] for v in stages},
        "selected_frac_sum": float(pc.sum(frac).as_py() or 0.0),
        "selected_frac_count": len(frac),
        "models": sorted(set(table.column("model").drop_null().to_pylist())),
    }


def merge_stats(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {
        "rows": 0, "rows_ok": 0, "errors_by_stage": {}, "selected_frac_sum": 0.0,
        "selected_frac_count": 0, "files": [], "models": [],
    }
    for part in parts:
        if not part:
            continue
        for key in ("rows", "rows_ok", "selected_frac_sum", "selected_frac_count"):
            total[key] += part[key]
        for stage, count in part["errors_by_stage"].items():
            total["errors_by_stage"][stage] = total["errors_by_stage"].get(stage, 0) + count
        total["files"].extend(part.get("files", []))
        total["models"] = sorted(set(total["models"]) | set(part.get("models", [])))
    return total


def with_file_metadata(table: pa.Table,
                       file_metadata: Callable[[pa.Table], dict[bytes, bytes]] | None) -> pa.Table:
    """`table` with the schema metadata its file carries (GeoParquet's `geo`: pipeline.geo)."""
    if file_metadata is None:
        return table
    return table.replace_schema_metadata({**(table.schema.metadata or {}),
                                          **file_metadata(table)})


class RowBuffer:
    """Answered rows on their way to Parquet: `add` appends a conformed table and writes a
    file when `rows_per_file` rows are held (and at the first add, so a job's first answers
    are on disk at once); `tick` writes the rows once the oldest has waited `flush_seconds`;
    `close` writes the rest and returns the merged stats. A table added twice (a retried
    write task: same `token`) is taken once. Thread-safe; `clock` is for tests."""

    def __init__(self, output: str, key_columns: tuple[str, ...], rows_per_file: int,
                 flush_seconds: float, clock: Callable[[], float] = time.monotonic,
                 file_metadata: Callable[[pa.Table], dict[bytes, bytes]] | None = None):
        self.output, self.key_columns, self.file_metadata = output, key_columns, file_metadata
        self.rows_per_file, self.flush_seconds, self.clock = rows_per_file, flush_seconds, clock
        self.tables: list[pa.Table] = []
        self.rows = 0
        self.oldest: float | None = None  # when the oldest buffered row arrived
        self.tokens: set[str] = set()
        self.stats: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.closed = False

    def add(self, table: pa.Table, token: str) -> int:
        """Buffer `table`; returns the rows now buffered (0 after a write)."""
        with self.lock:
            if self.closed:
                raise RuntimeError("write buffer is closed")
            if token in self.tokens or not table.num_rows:
                return self.rows
            self.tables.append(table)
            self.rows += table.num_rows
            self.tokens.add(token)
            if self.oldest is None:
                self.oldest = self.clock()
            if self.rows >= self.rows_per_file or not self.stats:
                self._flush()
            return self.rows

    def tick(self) -> bool:
        """Write the buffer if its oldest row has waited `flush_seconds`; True if it did."""
        with self.lock:
            if self.oldest is None or self.clock() - self.oldest < self.flush_seconds:
                return False
            self._flush()
            return True

    def close(self) -> dict[str, Any]:
        with self.lock:
            if self.rows:
                self._flush()
            self.closed = True
            return merge_stats(self.stats)

    def _flush(self) -> None:
        # The rows stay buffered until the file is whole: a failed write loses nothing here.
        table = with_file_metadata(pa.concat_tables(self.tables), self.file_metadata)
        uri = write_table(table, self.output, part_name(table, self.key_columns))
        stats = batch_stats(table)
        stats["files"] = [uri]
        self.stats.append(stats)
        logger.info("write: %d rows -> %s", table.num_rows, uri)
        self.tables, self.rows, self.oldest = [], 0, None


class _BufferActor(RowBuffer):
    """`RowBuffer` as the job's write actor, with a thread that calls `tick`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.failure: BaseException | None = None
        period = min(1.0, self.flush_seconds / 4)
        threading.Thread(target=self._ticker, args=(period,), daemon=True).start()

    def _ticker(self, period: float) -> None:
        while not self.closed:
            time.sleep(period)
            try:
                self.tick()
            except Exception as exc:  # reported by the next add or close
                logger.exception("timed write failed")
                self.failure = exc

    def add(self, table: pa.Table, token: str) -> int:
        if self.failure is not None:
            raise self.failure
        return super().add(table, token)


class ParquetSink(Datasink[dict]):
    """Ray Data datasink writing the output schema to `output` (local path or URI)."""

    def __init__(self, output: str, schema: pa.Schema, key_columns: tuple[str, ...] = ("id",),
                 rows_per_file: int | None = None,
                 flush_seconds: float = DEFAULT_FLUSH_SECONDS,
                 file_metadata: Callable[[pa.Table], dict[bytes, bytes]] | None = None):
        if rows_per_file is not None and rows_per_file < 1:
            raise ValueError(f"--rows-per-file must be >= 1, got {rows_per_file}")
        if not flush_seconds > 0:
            raise ValueError(f"--flush-seconds must be > 0, got {flush_seconds}")
        self.output = output
        self.schema = schema
        self.key_columns = key_columns
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self.buffer = None  # the RowBuffer actor, once start() made it
        # Schema metadata of each file from its rows (GeoParquet's `geo`: pipeline.geo).
        self.file_metadata = file_metadata
        self.stats: dict[str, Any] | None = None  # set on the driver when the write completes

    @property
    def min_rows_per_write(self) -> int | None:
        return None if self.buffer is not None else self.rows_per_file

    def start(self) -> ParquetSink:
        """Buffer the rows in a `RowBuffer` actor of this job (on the driver, before the
        write); returns the sink."""
        actor = ray.remote(num_cpus=0, max_restarts=0)(_BufferActor)
        self.buffer = actor.remote(self.output, self.key_columns, self.rows_per_file or 1,
                                   self.flush_seconds, file_metadata=self.file_metadata)
        return self

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        fs, root = open_fs(self.output)
        retrying(f"create {self.output}", lambda: fs.makedirs(root, exist_ok=True))

    def write(self, blocks: Iterable, ctx) -> dict[str, Any]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {}
        table = pa.concat_tables(tables, promote_options="permissive")
        require_columns(STAGE, table, self.key_columns)
        table = conform(table, self.schema)
        if self.buffer is not None:
            ray.get(self.buffer.add.remote(table, part_name(table, self.key_columns)))
            return {}
        table = with_file_metadata(table, self.file_metadata)
        uri = write_table(table, self.output, part_name(table, self.key_columns))
        stats = batch_stats(table)
        stats["files"] = [uri]
        logger.info("write: %d rows -> %s", table.num_rows, uri)
        return stats

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        parts = list(write_result.write_returns)
        if self.buffer is not None:
            parts.append(self._close_buffer())
        self.stats = merge_stats(parts)

    def on_write_failed(self, error: Exception) -> None:
        """Keep what was answered: the buffered rows are written before the job fails."""
        if self.buffer is not None:
            try:
                self.stats = merge_stats([self._close_buffer()])
            except Exception:  # the job's own error is the one to raise
                logger.exception("could not write the buffered rows after the job failed")

    def _close_buffer(self) -> dict[str, Any]:
        buffer, self.buffer = self.buffer, None
        try:
            return ray.get(buffer.close.remote())
        finally:
            ray.kill(buffer)

    def get_name(self) -> str:
        return "WriteParquet"
