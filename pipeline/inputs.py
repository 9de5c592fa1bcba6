"""Stage 1, list: turn `--input` into input rows (`id`, `source_uri`, extras), in a few large
blocks, on the driver.

`--input` may be
- a local folder or an object-storage prefix (`s3://bucket/tiles/`): every image file below it;
- a glob (`/data/**/*.tif`, `s3://bucket/tiles/*.jpg`);
- a single image file;
- a STAC ItemCollection or static catalogue (`.json`): an item per row, `--asset` picks
  the image (`pipeline.stac`);
- a manifest (`.parquet`, `.csv`, `.jsonl`) with columns `id` and `image_uri` (or `image`,
  `uri`, `path`, `source_uri`), and optionally `question` and `ground_truth`, or a folder of
  manifest shards (such files and no images), read in name order. Relative image paths
  resolve against the manifest's folder. Other manifest columns ride along.

Ids are stable across runs (the path relative to the folder or glob root, or the manifest id),
which is what resume joins on. Listing reads names only; bytes are fetched by decode tasks.
A local name that is not valid UTF-8 keeps its undecodable bytes as `\\xNN` in the id and is
read through a percent-encoded `file://` URI (`pipeline.storage.to_uri`).

Scale: `iter_inputs` yields the rows in blocks of `LISTING_BLOCK_ROWS`, reading manifests
piece by piece (Parquet row groups, CSV / JSONL in `MANIFEST_READ_BYTES` blocks), so the
driver holds one block and the ids (for the duplicate check) at a time. Object-store prefixes
are listed with one delimiter listing per level and the sub-prefixes in parallel, each
paginated (`find_files`).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq

from pipeline.columns import GROUND_TRUTH, QUESTION
from pipeline.stac import is_stac, iter_stac
from pipeline.storage import is_local, open_fs, printable, retrying, to_uri

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".jp2",
)
MANIFEST_EXTENSIONS = (".parquet", ".csv", ".jsonl")
URI_COLUMNS = ("image_uri", "image", "uri", "path", "source_uri")
GLOB_CHARS = "*?["
# rows per block handed to Ray (100 blocks for 1M inputs): each block is one decode task, so
# this bounds how many decode tasks run at once on a large job
LISTING_BLOCK_ROWS = 10_000
MANIFEST_READ_BYTES = 32 * 1024**2  # CSV / JSONL read block; Parquet goes by row group
LIST_THREADS = 16  # concurrent sub-prefix listings on object storage
LIST_FANOUT_DEPTH = 3  # levels of sub-prefixes expanded while fewer than LIST_THREADS

INPUT_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
]


@dataclass(frozen=True)
class InputConfig:
    input: str
    limit: int | None = None  # keep the first N inputs (in listing order) before resume
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    asset: str | None = None  # STAC input: the asset to read (default: visual, else an image)

    def __post_init__(self) -> None:
        if not str(self.input).strip():
            raise ValueError("--input must name a folder, glob, URI prefix or manifest")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be a positive integer, got {self.limit}")
        if self.asset is not None and not self.asset.strip():
            raise ValueError("--asset must name a STAC asset (e.g. visual), not be blank")
        object.__setattr__(self, "extensions", tuple(e.lower() for e in self.extensions))


def list_inputs(config: InputConfig) -> pa.Table:
    """The whole input table at once (small inputs, tests): `iter_inputs` concatenated."""
    return pa.concat_tables(iter_inputs(config), promote_options="permissive")


class Source(NamedTuple):
    """`--input` opened: its kind, its input tables (lazy: a folder or glob is listed once, when
    opened; a manifest is read as the tables are taken) and, for a manifest of files (not STAC),
    the files' URIs in listing order."""

    kind: str
    pieces: Iterator[pa.Table]
    manifest_files: tuple[str, ...] = ()


def open_source(config: InputConfig) -> Source:
    return _open_source(str(config.input), config.extensions, config.asset)


def iter_inputs(config: InputConfig, block_rows: int | None = None,
                opened: Source | None = None) -> Iterator[pa.Table]:
    """The input rows (`id`, `source_uri`, optional `question` / `ground_truth`, extras) in
    listing order, in blocks of `block_rows` (default LISTING_BLOCK_ROWS), `--limit` applied. Raises ValueError, naming
    `--input`, for nothing found, a bad manifest or duplicate manifest ids (after the last
    block: ids are checked across all of them). `opened`: `open_source(config)`, if done."""
    source = str(config.input)
    kind, pieces, _ = opened or open_source(config)
    total, ids = 0, []
    for block in rebatch(pieces, block_rows or LISTING_BLOCK_ROWS):
        if config.limit is not None:
            block = block.slice(0, config.limit - total)
        if block.num_rows:
            total += block.num_rows
            if kind == "manifest":
                ids.append(block.column("id"))
            yield block
        if config.limit is not None and total >= config.limit:
            break
    if total == 0:
        raise ValueError(f"--input {source!r}: found no images ({', '.join(config.extensions)})")
    if ids:
        _check_unique(pa.chunked_array([c for col in ids for c in col.chunks], pa.string()),
                      source)
    logger.info("listed %d inputs from %s %s", total, kind, source)


def rebatch(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The rows of `tables`, in order, as contiguous tables of `rows` rows (the last fewer)."""
    buffer: list[pa.Table] = []
    buffered = 0
    for table in tables:
        buffer.append(table)
        buffered += table.num_rows
        while buffered >= rows:
            merged = pa.concat_tables(buffer, promote_options="permissive")
            yield merged.slice(0, rows).combine_chunks()
            buffer, buffered = [merged.slice(rows)], buffered - rows
    if buffered:
        yield pa.concat_tables(buffer, promote_options="permissive").combine_chunks()


def _open_source(source: str, extensions: tuple[str, ...],
                 asset: str | None = None) -> Source:
    # What --input is, and a folder's listing, asked of the store on the driver: retried
    # through a transient outage like every other read (pipeline.storage.retrying).
    return retrying(f"list {source}", lambda: _classify(source, extensions, asset))


def _classify(source: str, extensions: tuple[str, ...], asset: str | None) -> Source:
    fs, path = open_fs(source)
    if is_stac(path) and fs.isfile(path):
        return Source("manifest", iter_stac(source, asset))  # (ids checked for duplicates too)
    if any(c in path for c in GLOB_CHARS):
        return Source("glob", iter([_list_glob(fs, path, extensions)]))
    if fs.isdir(path):
        files = sorted(find_files(fs, path))
        images = [p for p in files if _keep(p, extensions)]
        shards = [p for p in files if _keep(p, MANIFEST_EXTENSIONS)]
        if images or not shards:
            return Source("folder", iter([_paths_table(fs, path, images)]))
        logger.info("--input %s: a folder of %d manifest shards", source, len(shards))
        uris = tuple(to_uri(fs, p) for p in shards)
        return Source("manifest", (t for uri in uris for t in iter_manifest(uri)), uris)
    if fs.isfile(path) and path.lower().endswith(MANIFEST_EXTENSIONS):
        return Source("manifest", iter_manifest(source), (source,))
    if fs.isfile(path):
        return Source("file", iter([_table([printable(posixpath.basename(path))],
                                           [to_uri(fs, path)])]))
    raise ValueError(f"--input {source!r}: no such folder, file, glob match or manifest")


def _table(ids: list[str], uris: list[str]) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.array(uris, pa.string())], schema=pa.schema(INPUT_FIELDS)
    )


def _keep(path: str, extensions: tuple[str, ...]) -> bool:
    name = posixpath.basename(path)
    return not name.startswith((".", "_")) and name.lower().endswith(extensions)


def find_files(fs, root: str) -> list[str]:
    """Every file below `root`. On object storage: the top levels with delimiter listings
    (expanded, in parallel, while there are fewer sub-prefixes than LIST_THREADS), then every
    sub-prefix's flat listing, paginated, LIST_THREADS at a time."""
    if is_local(fs):
        return fs.find(root)
    files: list[str] = []
    prefixes = [root]
    with ThreadPoolExecutor(LIST_THREADS) as pool:
        for _ in range(LIST_FANOUT_DEPTH):
            if len(prefixes) >= LIST_THREADS:
                break
            deeper = []
            for entries in pool.map(lambda p: fs.ls(p, detail=True), prefixes):
                files += [e["name"] for e in entries if e["type"] != "directory"]
                deeper += [e["name"] for e in entries if e["type"] == "directory"]
            prefixes = deeper
        for found in pool.map(fs.find, prefixes):
            files += found
    fs.invalidate_cache()  # s3fs keeps every listing; let the names go
    return files


def _paths_table(fs, root: str, files: list[str]) -> pa.Table:
    return _table([printable(posixpath.relpath(p, root)) for p in files],
                  [to_uri(fs, p) for p in files])


def _list_glob(fs, pattern: str, extensions: tuple[str, ...]) -> pa.Table:
    # The root is the part before the first wildcard; ids are relative to it.
    first = min(pattern.index(c) for c in GLOB_CHARS if c in pattern)
    root = posixpath.dirname(pattern[:first])
    files = sorted(p for p in fs.glob(pattern) if fs.isfile(p) and _keep(p, extensions))
    return _paths_table(fs, root, files)


def iter_table_file(uri: str, text_columns: tuple[str, ...], flag: str) -> Iterator[pa.Table]:
    """A Parquet, CSV or JSONL file as tables of a row group or a read block each; CSV
    ``text_columns`` stay text (ids like "007" must not become 7). ``flag`` names the option
    in errors."""
    fs, path = open_fs(uri)
    lower = path.lower()
    if not lower.endswith((".parquet", ".csv", ".jsonl", ".json")):
        raise ValueError(f"{flag} {uri!r}: expected a .parquet, .csv or .jsonl file")
    with fs.open(path, "rb") as f:
        if lower.endswith(".parquet"):
            parquet = pq.ParquetFile(f)
            for group in range(parquet.num_row_groups):
                yield parquet.read_row_group(group)
            return
        if lower.endswith(".csv"):
            as_text = {c: pa.string() for c in text_columns}
            reader = pyarrow.csv.open_csv(
                f, read_options=pyarrow.csv.ReadOptions(block_size=MANIFEST_READ_BYTES),
                convert_options=pyarrow.csv.ConvertOptions(column_types=as_text))
        else:
            reader = pyarrow.json.open_json(
                f, read_options=pyarrow.json.ReadOptions(block_size=MANIFEST_READ_BYTES))
        schema = reader.schema
        yielded = False
        for batch in reader:
            yielded = True
            yield pa.Table.from_batches([batch])
        if not yielded:
            yield schema.empty_table()


def read_table_file(uri: str, text_columns: tuple[str, ...], flag: str) -> pa.Table:
    """`iter_table_file`, whole."""
    return pa.concat_tables(iter_table_file(uri, text_columns, flag))


def read_manifest(uri: str) -> pa.Table:
    """Read a Parquet/CSV/JSONL manifest into the input table (validated)."""
    tables = list(iter_manifest(uri))
    table = pa.concat_tables(tables, promote_options="permissive")
    _check_unique(table.column("id"), uri)
    return table


def iter_manifest(uri: str) -> Iterator[pa.Table]:
    """A manifest's rows as input tables, piece by piece, each validated (ids are checked
    for duplicates by the caller, across pieces)."""
    fs, path = open_fs(uri)  # relative image URIs resolve against the manifest's folder
    base = posixpath.dirname(path)
    text = ("id", *URI_COLUMNS, QUESTION, GROUND_TRUTH)
    for raw in iter_table_file(uri, text, "--input manifest"):
        yield _manifest_rows(raw, uri, fs, base)


def _manifest_rows(raw: pa.Table, uri: str, fs, base: str) -> pa.Table:
    if "id" not in raw.column_names:
        raise ValueError(f"--input manifest {uri!r}: needs an 'id' column, has {raw.column_names}")
    uri_col = next((c for c in URI_COLUMNS if c in raw.column_names), None)
    if uri_col is None:
        raise ValueError(
            f"--input manifest {uri!r}: needs an image URI column (one of {list(URI_COLUMNS)}),"
            f" has {raw.column_names}"
        )
    ids = raw.column("id").cast(pa.string())
    uris = raw.column(uri_col).cast(pa.string())
    if ids.null_count or uris.null_count:
        raise ValueError(f"--input manifest {uri!r}: 'id' and {uri_col!r} must not be empty")
    table = pa.Table.from_arrays([ids, resolve_uris(fs, base, uris)],
                                 schema=pa.schema(INPUT_FIELDS))
    for name in raw.column_names:
        if name in ("id", uri_col):
            continue
        column = raw.column(name)
        if name in (QUESTION, GROUND_TRUTH):
            column = column.cast(pa.string())
        table = table.append_column(name, column)
    return table


def resolve_uris(fs, base: str, uris: pa.ChunkedArray) -> pa.ChunkedArray:
    """Relative paths joined to `base` as URIs; absolute paths and URIs as they are.
    Vectorised; only paths with `.` or `..` segments or `//` are normalised one by one."""
    absolute = pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/"))
    if pc.all(absolute).as_py() is not False:
        return uris
    prefix = to_uri(fs, posixpath.join(base, "x"))[:-1]
    if not is_local(fs) or prefix.startswith("/"):
        odd = pc.and_(pc.invert(absolute),
                      pc.match_substring_regex(uris, r"(^|/)\.\.?(/|$)|//"))
        if not pc.any(odd).as_py():
            joined = pc.binary_join_element_wise(prefix, uris, "")
            return pc.if_else(absolute, uris, joined)
    return pa.chunked_array([pa.array([_resolve(fs, base, u) for u in uris.to_pylist()],
                                      pa.string())])


def _resolve(fs, base: str, uri: str) -> str:
    if "://" in uri or posixpath.isabs(uri):
        return uri
    return to_uri(fs, posixpath.normpath(posixpath.join(base, uri)))


def _check_unique(ids: pa.ChunkedArray, uri: str) -> None:
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    dupes = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
    raise ValueError(f"--input manifest {uri!r}: duplicate ids {dupes[:5]}")
