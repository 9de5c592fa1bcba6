"""Stage 4, write: Parquet files with the stable output schema, committed atomically.

`ParquetSink` is a Ray Data `Datasink` (`ds.write_datasink(sink)`). Each write task conforms
its blocks to the schema and writes one file, named after a hash of the keys it holds, so a
retried task rewrites the same file instead of adding a duplicate. `rows_per_file` makes Ray
Data bundle at least that many rows into each write (the last one may hold fewer): fewer,
larger files for resume to read, against rows that wait longer to be committed.

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
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
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


class ParquetSink(Datasink[dict]):
    """Ray Data datasink writing the output schema to `output` (local path or URI)."""

    def __init__(self, output: str, schema: pa.Schema, key_columns: tuple[str, ...] = ("id",),
                 rows_per_file: int | None = None,
                 file_metadata: Callable[[pa.Table], dict[bytes, bytes]] | None = None):
        if rows_per_file is not None and rows_per_file < 1:
            raise ValueError(f"--rows-per-file must be >= 1, got {rows_per_file}")
        self.output = output
        self.schema = schema
        self.key_columns = key_columns
        self.rows_per_file = rows_per_file
        # Schema metadata of each file from its rows (GeoParquet's `geo`: pipeline.geo).
        self.file_metadata = file_metadata
        self.stats: dict[str, Any] | None = None  # set on the driver when the write completes

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_file

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
        if self.file_metadata is not None:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                   **self.file_metadata(table)})
        uri = write_table(table, self.output, part_name(table, self.key_columns))
        stats = batch_stats(table)
        stats["files"] = [uri]
        logger.info("write: %d rows -> %s", table.num_rows, uri)
        return stats

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        self.stats = merge_stats(write_result.write_returns)

    def get_name(self) -> str:
        return "WriteParquet"
