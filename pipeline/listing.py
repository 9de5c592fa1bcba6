"""Listing in the cluster: a manifest read by Ray Data read tasks, so that the driver holds no
per-input state however many inputs there are.

`pipeline.run` uses this for a manifest input (a file, or a folder of shards) of more than
`LISTING_BLOCK_ROWS` rows (`large_manifest`) when the job's rows are keyed by `id` and no
`--limit` is set: one read task per manifest file, one running at a time in listing order,
each reading its file piece by piece (`pipeline.inputs.iter_manifest`) and dropping the ids
already written (read from the object store, where `pipeline.resume.DoneKeys` put them). Ray
Data joins what a read task yields into blocks of up to the Dataset's `target_max_block_size`;
a decode task takes such a block and hands on its rows a few at a time. The read tasks ask for no
CPU (they mostly wait for decode to take their blocks) and report their counts, and a 64-bit
hash of each id, to one `Tally` actor: the driver reads the totals for the run summary, and
the ids are checked for duplicates across shards there (within a shard the read task checks
them itself, as `iter_inputs` does).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pandas.util import hash_array
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import inputs
from pipeline.inputs import iter_manifest, rebatch
from pipeline.resume import pending
from pipeline.storage import open_fs

logger = logging.getLogger(__name__)

READ_ARGS = {"num_cpus": 0}  # a read task mostly waits for decode to take its blocks


SMALL_TEXT_MANIFEST_BYTES = 1024**2  # a CSV / JSONL manifest up to this size is listed by the driver


def large_manifest(files: list[str]) -> bool:
    """More rows than one listing block (Parquet: from the footers), or CSV / JSONL over
    `SMALL_TEXT_MANIFEST_BYTES`: then the listing streams in the cluster."""
    rows = 0
    for uri in files:
        fs, path = open_fs(uri)
        if not path.lower().endswith(".parquet"):
            if fs.size(path) > SMALL_TEXT_MANIFEST_BYTES:
                return True
            continue
        with fs.open(path, "rb") as f:
            rows += pq.read_metadata(f).num_rows
        if rows > inputs.LISTING_BLOCK_ROWS:
            return True
    return False


class Tally:
    """Counts from the read tasks, and the ids' 64-bit hashes for the duplicate check across
    manifest files (8 bytes an input, in this actor, never on the driver)."""

    def __init__(self):
        self.listed = self.skipped = 0
        self.hashes: list[np.ndarray] = []

    def add(self, listed: int, skipped: int, hashes: np.ndarray) -> None:
        self.listed += listed
        self.skipped += skipped
        self.hashes.append(hashes)

    def totals(self) -> tuple[int, int, int]:
        """(listed, skipped, ids seen in more than one manifest file)."""
        merged = np.sort(np.concatenate(self.hashes)) if self.hashes else np.zeros(0, np.uint64)
        self.hashes = [merged]
        repeated = int(np.count_nonzero(merged[1:] == merged[:-1]))
        return self.listed, self.skipped, repeated


def _read_manifest_file(uri: str, done, key: str, tally,
                        block_rows: int) -> Iterator[pa.Table]:
    done_table = ray.get(done) if isinstance(done, ray.ObjectRef) else done
    ids = []
    listed = kept = 0
    for block in rebatch(iter_manifest(uri), block_rows):
        ids.append(block.column(key))
        listed += block.num_rows
        left = pending(block, done_table, (key,)) if done_table is not None else block
        kept += left.num_rows
        if left.num_rows:
            yield left
    column = pa.chunked_array([c for col in ids for c in col.chunks], pa.string())
    inputs._check_unique(column, uri)
    hashes = hash_array(np.asarray(column.to_numpy(zero_copy_only=False), dtype=object))
    ray.get(tally.add.remote(listed, listed - kept, hashes))
    logger.info("listed %d inputs from %s, %d to run", listed, uri, kept)


class ManifestDatasource(Datasource):
    """The inputs of manifest `files` still to run (see the module's docstring)."""

    def __init__(self, files: list[str], done, key: str):
        self.files, self.done, self.key = files, done, key
        self.block_rows = inputs.LISTING_BLOCK_ROWS  # read here, on the driver
        self.tally = ray.remote(num_cpus=0)(Tally).remote()

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_read_manifest_file, uri, self.done, self.key,
                                           self.tally, self.block_rows),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                       input_files=(uri,)))
                for uri in self.files]

    def get_name(self) -> str:
        return "ListManifest"

    def totals(self) -> tuple[int, int, int]:
        return ray.get(self.tally.totals.remote())


def read_manifest_inputs(files: list[str], done, key: str):
    """(Dataset of the inputs to run, the datasource whose `totals()` count them afterwards).
    One read task at a time keeps the listing in order and its memory to one file's ids."""
    source = ManifestDatasource(files, done, key)
    # override_num_blocks: one read task per file and no SplitBlocks after it (Ray Data would
    # split each block into many to reach its default parallelism).
    ds = ray.data.read_datasource(source, concurrency=1, override_num_blocks=len(files),
                                  **READ_ARGS)
    return ds, source
