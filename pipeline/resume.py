"""Resume: a rerun into the same output skips what is already written (an anti-join on keys).

At scale the written keys never pass through the driver: `DoneKeys.collect` reads them in a
Ray task, which keeps them in the object store, and `drop_done_blocks` filters the input
blocks in Ray tasks that each read them from there (the driver gets counts only).

Ray Data 2.60 has checkpointing (`ray.data.checkpoint.CheckpointConfig`), but it filters at the
read operator, wants its own checkpoint store, and keys rows that must exist before the read;
our rows are keyed on input ids known at listing time, and multi-row inputs (pages) are keyed
after decode. So resume here is plain: read the key columns of the committed Parquet files
under the output, drop inputs whose keys are there, run the rest. Only whole files count (see
`pipeline.write`), so a half-written file never hides an input. Every run first removes stale
temporary files and moves aside committed files that are not whole Parquet (`prepare_output`),
so a damaged file is neither counted nor fails the run: its inputs simply run again.
"""

from __future__ import annotations

import logging
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline.storage import is_local, open_fs, retrying, to_uri
from pipeline.write import PARQUET_SUFFIX, TMP_SUFFIX

logger = logging.getLogger(__name__)

SUMMARY_NAME = "_summary.json"
CORRUPT_SUFFIX = ".corrupt"
READ_THREADS = 16  # output files read at once (their key columns)


def _is_output_file(path: str) -> bool:
    name = posixpath.basename(path)
    return name.endswith(PARQUET_SUFFIX) and not name.startswith((".", "_"))


def list_output_files(output: str) -> list[str]:
    """Committed Parquet files directly under `output` (URIs), sorted."""
    fs, root = open_fs(output)
    fs.invalidate_cache()
    if not fs.exists(root):
        return []
    return sorted(to_uri(fs, p) for p in fs.ls(root, detail=False) if _is_output_file(p))


def _read_file(uri: str, columns: list[str] | None) -> pa.Table:
    fs, path = open_fs(uri)

    def read() -> pa.Table:
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    try:
        return retrying(f"read {uri}", read)
    except Exception as exc:
        raise ValueError(
            f"output file {uri} is not readable Parquet ({exc}); remove it or use --overwrite"
        ) from exc


def read_files(files: list[str], columns: list[str] | None = None) -> pa.Table:
    """The rows of `files` (empty table if none), READ_THREADS files at a time."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        tables = list(pool.map(lambda uri: _read_file(uri, columns), files))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in (columns or [])})
    return pa.concat_tables(tables, promote_options="permissive")


def read_output(output: str, columns: list[str] | None = None) -> pa.Table:
    """All committed rows under `output` (empty table if none)."""
    return read_files(list_output_files(output), columns)


def done_keys(output: str, key_columns: tuple[str, ...], task: str) -> pa.Table:
    """Distinct key rows already written; refuses an output written by another task."""
    return _distinct_keys(read_output(output, columns=_key_and_task(key_columns)), output,
                          key_columns, task)


def _key_and_task(key_columns: tuple[str, ...]) -> list[str]:
    return list(dict.fromkeys([*key_columns, "task"]))


def _distinct_keys(table: pa.Table, output: str, key_columns: tuple[str, ...],
                   task: str) -> pa.Table:
    if table.num_rows:
        tasks = set(pc.unique(table.column("task")).to_pylist()) - {None}
        if tasks - {task}:
            raise ValueError(
                f"--output {output} holds rows of task(s) {sorted(tasks)}, not {task!r}; "
                "use another --output or --overwrite"
            )
    keys = table.select(list(key_columns))
    return keys.group_by(list(key_columns)).aggregate([])


@ray.remote(num_returns=2)
def _collect_done(files: list[str], output: str, key_columns: tuple[str, ...],
                  task: str) -> tuple[pa.Table, int]:
    keys = _distinct_keys(read_files(files, _key_and_task(key_columns)), output, key_columns,
                          task)
    return keys, keys.num_rows


@dataclass(frozen=True)
class DoneKeys:
    """The distinct key rows already written under an output, held in the object store by the
    task that read them (`ref`; None when nothing is written), and how many there are."""

    key_columns: tuple[str, ...]
    rows: int = 0
    ref: ray.ObjectRef | None = None

    @classmethod
    def collect(cls, output: str, key_columns: tuple[str, ...], task: str) -> DoneKeys:
        """Read the keys of `output`'s committed files in a Ray task; the driver lists file
        names and gets the count. Raises ValueError as `done_keys` does."""
        files = list_output_files(output)
        if not files:
            return cls(key_columns)
        keys, rows = _collect_done.remote(files, output, key_columns, task)
        try:
            return cls(key_columns, ray.get(rows), keys)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ValueError):  # the message without the remote traceback
                raise exc.cause.with_traceback(None) from None
            raise

    def table(self) -> pa.Table:
        """The keys on this process (small outputs and tests only)."""
        if self.ref is None:
            return pa.table({c: pa.array([], pa.string()) for c in self.key_columns})
        return ray.get(self.ref)


@ray.remote(num_returns=2)
def _drop_done_block(block: pa.Table, done: pa.Table) -> tuple[pa.Table, int]:
    left = pending(block, done)
    return left, left.num_rows


def drop_done_blocks(blocks: list, rows: int, done: DoneKeys) -> tuple[list, int]:
    """Resume for inputs keyed by `id`: each input block (an ObjectRef; `rows` in all)
    filtered in its own Ray task against the written keys, read there from the object store.
    Returns the refs of the non-empty filtered blocks and the number of rows left."""
    if done.ref is None:
        return blocks, rows
    launched = [_drop_done_block.remote(block, done.ref) for block in blocks]
    counts = ray.get([count for _, count in launched])
    kept = [left for (left, _), n in zip(launched, counts) if n]
    return kept, sum(counts)


def drop_written(batch: pa.Table, done, key_columns: tuple[str, ...]) -> pa.Table:
    """Resume filter for tasks keyed after decode (e.g. `id` + `page`), a Ray Data UDF;
    `done` is a table or the ObjectRef of one (`DoneKeys.ref`)."""
    if isinstance(done, ray.ObjectRef):
        done = ray.get(done)
    return pending(batch, done, key_columns)


def pending(inputs: pa.Table, done: pa.Table, key_columns: tuple[str, ...] = ("id",)) -> pa.Table:
    """Rows of `inputs` whose keys are not in `done` (keys must be input columns)."""
    if done.num_rows == 0:
        return inputs
    if len(key_columns) == 1:
        key = key_columns[0]
        seen = pc.is_in(inputs.column(key), value_set=done.column(key).combine_chunks())
        return inputs.filter(pc.invert(seen))
    # Not a join: a join never matches null keys, and an error row of a document that could
    # not be opened has a null `page`; it must count as written like any other row. Only the
    # done rows of this batch's ids are looked at.
    done = done.filter(pc.is_in(done.column("id"), value_set=inputs.column("id").unique()))
    seen = set(zip(*(done.column(c).to_pylist() for c in key_columns)))
    keys = zip(*(inputs.column(c).to_pylist() for c in key_columns))
    return inputs.filter(pa.array([k not in seen for k in keys], pa.bool_()))


def prepare_output(output: str, overwrite: bool) -> None:
    """Remove stale temporary files; with `overwrite`, also every previous result. Without it,
    move aside (`quarantine`) any committed file that is not whole Parquet, so its rows run
    again instead of the job failing or counting them."""
    fs, root = open_fs(output)
    fs.invalidate_cache()
    if not fs.exists(root):
        return
    removed = 0
    kept = []
    for path in fs.ls(root, detail=False):
        name = posixpath.basename(path)
        stale_tmp = name.startswith(".") and name.endswith(TMP_SUFFIX)
        previous = overwrite and (_is_output_file(path) or name == SUMMARY_NAME)
        if (stale_tmp or previous) and (not is_local(fs) or fs.isfile(path)):
            fs.rm(path)
            removed += 1
        elif _is_output_file(path):
            kept.append(path)
    if removed:
        logger.info("removed %d %s file(s) under %s", removed,
                    "previous" if overwrite else "stale temporary", output)
    for path in kept:
        quarantine(fs, path)


def quarantine(fs, path: str) -> bool:
    """Move a committed output file whose Parquet footer cannot be read (truncated, not
    Parquet) to a hidden `.<name>.<time>.corrupt`; True if it did. Storage errors are
    retried and raised, never taken for corruption."""
    uri = to_uri(fs, path)

    def footer() -> None:
        with fs.open(path, "rb") as f:
            pq.read_metadata(f)

    try:
        retrying(f"read {uri}", footer)
        return False
    except pa.ArrowInvalid as exc:
        target = posixpath.join(posixpath.dirname(path),
                                f".{posixpath.basename(path)}.{int(time.time())}{CORRUPT_SUFFIX}")
        fs.mv(path, target)
        logger.warning("output file %s is not whole Parquet (%s); moved it to %s: its rows "
                       "run again", uri, exc, to_uri(fs, target))
        return True
