"""Stage 1, list: turn `--input` into a table of inputs, one row per image, on the driver.

`--input` may be
- a local folder or an object-storage prefix (`s3://bucket/tiles/`): every image file below it;
- a glob (`/data/**/*.tif`, `s3://bucket/tiles/*.jpg`);
- a single image file;
- a manifest (`.parquet`, `.csv`, `.jsonl`) with columns `id` and `image_uri` (or `image`,
  `uri`, `path`, `source_uri`), and optionally `question` and `ground_truth`. Relative image
  paths resolve against the manifest's folder. Other manifest columns ride along.

Ids are stable across runs (the path relative to the folder or glob root, or the manifest id),
which is what resume joins on. Listing reads names only; bytes are fetched by decode tasks.
A local name that is not valid UTF-8 keeps its undecodable bytes as `\\xNN` in the id and is
read through a percent-encoded `file://` URI (`pipeline.storage.to_uri`).
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq

from pipeline.columns import GROUND_TRUTH, QUESTION
from pipeline.storage import open_fs, printable, to_uri

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".jp2",
)
MANIFEST_EXTENSIONS = (".parquet", ".csv", ".jsonl")
URI_COLUMNS = ("image_uri", "image", "uri", "path", "source_uri")
GLOB_CHARS = "*?["

INPUT_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
]


@dataclass(frozen=True)
class InputConfig:
    input: str
    limit: int | None = None  # keep the first N inputs (in listing order) before resume
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS

    def __post_init__(self) -> None:
        if not str(self.input).strip():
            raise ValueError("--input must name a folder, glob, URI prefix or manifest")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be a positive integer, got {self.limit}")
        object.__setattr__(self, "extensions", tuple(e.lower() for e in self.extensions))


def list_inputs(config: InputConfig) -> pa.Table:
    """The input table: `id`, `source_uri`, optional `question` / `ground_truth`, extras."""
    source = str(config.input)
    fs, path = open_fs(source)
    if any(c in path for c in GLOB_CHARS):
        table = _list_glob(fs, path, config.extensions)
        kind = "glob"
    elif fs.isdir(path):
        table = _list_folder(fs, path, config.extensions)
        kind = "folder"
    elif fs.isfile(path) and path.lower().endswith(MANIFEST_EXTENSIONS):
        table = read_manifest(source)
        kind = "manifest"
    elif fs.isfile(path):
        table = _table([printable(posixpath.basename(path))], [to_uri(fs, path)])
        kind = "file"
    else:
        raise ValueError(f"--input {source!r}: no such folder, file, glob match or manifest")
    if table.num_rows == 0:
        raise ValueError(f"--input {source!r}: found no images ({', '.join(config.extensions)})")
    if config.limit is not None:
        table = table.slice(0, config.limit)
    logger.info("listed %d inputs from %s %s", table.num_rows, kind, source)
    return table


def _table(ids: list[str], uris: list[str]) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.array(uris, pa.string())], schema=pa.schema(INPUT_FIELDS)
    )


def _keep(path: str, extensions: tuple[str, ...]) -> bool:
    name = posixpath.basename(path)
    return not name.startswith((".", "_")) and name.lower().endswith(extensions)


def _list_folder(fs, root: str, extensions: tuple[str, ...]) -> pa.Table:
    files = sorted(p for p in fs.find(root) if _keep(p, extensions))
    return _table([printable(posixpath.relpath(p, root)) for p in files],
                  [to_uri(fs, p) for p in files])


def _list_glob(fs, pattern: str, extensions: tuple[str, ...]) -> pa.Table:
    # The root is the part before the first wildcard; ids are relative to it.
    first = min(pattern.index(c) for c in GLOB_CHARS if c in pattern)
    root = posixpath.dirname(pattern[:first])
    files = sorted(p for p in fs.glob(pattern) if fs.isfile(p) and _keep(p, extensions))
    return _table([printable(posixpath.relpath(p, root)) for p in files],
                  [to_uri(fs, p) for p in files])


def read_table_file(uri: str, text_columns: tuple[str, ...], flag: str) -> pa.Table:
    """A Parquet, CSV or JSONL file as a table; CSV ``text_columns`` stay text (ids like "007"
    must not become 7). ``flag`` names the option in errors."""
    fs, path = open_fs(uri)
    lower = path.lower()
    with fs.open(path, "rb") as f:
        if lower.endswith(".parquet"):
            return pq.read_table(f)
        if lower.endswith(".csv"):
            as_text = {c: pa.string() for c in text_columns}
            return pyarrow.csv.read_csv(
                f, convert_options=pyarrow.csv.ConvertOptions(column_types=as_text))
        if lower.endswith((".jsonl", ".json")):
            return pyarrow.json.read_json(f)
    raise ValueError(f"{flag} {uri!r}: expected a .parquet, .csv or .jsonl file")


def read_manifest(uri: str) -> pa.Table:
    """Read a Parquet/CSV/JSONL manifest into the input table (validated)."""
    raw = read_table_file(uri, ("id", *URI_COLUMNS, QUESTION, GROUND_TRUTH), "--input manifest")
    fs, path = open_fs(uri)  # relative image URIs resolve against the manifest's folder
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
    _check_unique(ids, uri)
    base = posixpath.dirname(path)
    resolved = [_resolve(fs, base, u) for u in uris.to_pylist()]
    table = _table(ids.to_pylist(), resolved)
    for name in raw.column_names:
        if name in ("id", uri_col):
            continue
        column = raw.column(name)
        if name in (QUESTION, GROUND_TRUTH):
            column = column.cast(pa.string())
        table = table.append_column(name, column)
    return table


def _resolve(fs, base: str, uri: str) -> str:
    if "://" in uri or posixpath.isabs(uri):
        return uri
    return to_uri(fs, posixpath.normpath(posixpath.join(base, uri)))


def _check_unique(ids: pa.ChunkedArray, uri: str) -> None:
    counts = pc.value_counts(ids)
    dupes = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
    if dupes:
        raise ValueError(f"--input manifest {uri!r}: duplicate ids {dupes[:5]}")
