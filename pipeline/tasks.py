"""What makes one job differ from another: a `Task` plugs into the task-agnostic core
(list -> decode -> predict -> [finalize] -> write).

- `default_prompt`: the question asked when the input row has none (`--prompt` overrides it).
- `extra_fields`: task columns written after the standard ones (RSVQA: `question_type`,
  `ground_truth`, `correct`; OCR: `page`).
- `expand`: decode hook for inputs that yield several rows (PDF / multi-page TIFF pages).
- `finalize`: a CPU function over each predicted batch that fills the task columns (scoring).
- `key_columns`: what makes an output row unique; resume skips inputs whose keys are written.
- `extensions`: file name endings listed from folders and globs (None: the image extensions).
- `file_metadata`: each output file's schema metadata, from its rows (the caption job's
  GeoParquet `geo` key, `pipeline.geo.geoparquet_metadata`).
- `report`: the task's summary of a finished output (RSVQA: accuracy per question type; OCR:
  CER/WER), which the jobs write beside the Parquet and print.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pyarrow as pa

from pipeline.decode import Expand
from pipeline.geo import CHIP_KEYS, GEO_FIELDS, geoparquet_metadata
from pipeline.predict import PREDICT_EXTRA_FIELDS
from pipeline.stac import STAC_FIELDS


@dataclass(frozen=True)
class Report:
    """A task's summary of a finished output, written as `OUTPUT/_<name>.json` and `.md`.

    `summarize` turns the written `columns` into a JSON-able dict of scores; `rows` gives the
    (metric, value) lines printed at the end of a job; `markdown` the `.md` document."""

    name: str
    title: str
    columns: tuple[str, ...]
    summarize: Callable[[pa.Table], dict]
    rows: Callable[[dict], list[tuple[str, str]]]
    markdown: Callable[[dict], str]


@dataclass(frozen=True)
class Task:
    name: str
    default_prompt: str
    extra_fields: tuple[pa.Field, ...] = ()
    expand: Expand | None = None
    finalize: Callable[[pa.Table], pa.Table] | None = None
    key_columns: tuple[str, ...] = ("id",)
    extensions: tuple[str, ...] | None = None
    report: Report | None = None
    file_metadata: Callable[[pa.Table], dict[bytes, bytes]] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a task needs a name (the `task` column)")
        if "id" not in self.key_columns:
            raise ValueError("task key_columns must include 'id'")


CAPTION = Task(
    name="caption",
    default_prompt="Describe this remote sensing image in detail.",
    # selection_map for --save-overlays' heat map; tflops; then where each row lies
    # (chip_row, chip_col, window, crs, geometry, bbox_lonlat, empty) and, for STAC input,
    # the item's datetime and collection
    extra_fields=(*PREDICT_EXTRA_FIELDS, *GEO_FIELDS, *STAC_FIELDS),
    file_metadata=geoparquet_metadata,  # GeoParquet 1.1: geopandas.read_parquet(output)
)


def chipped(task: Task) -> Task:
    """`task` keyed per chip (`id`, `chip_row`, `chip_col`), so that resume runs only the
    chips of a scene that are missing."""
    if set(CHIP_KEYS) <= set(task.key_columns):
        return task
    return replace(task, key_columns=tuple(dict.fromkeys((*task.key_columns, *CHIP_KEYS))))
