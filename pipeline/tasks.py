"""What makes one job differ from another: a `Task` plugs into the task-agnostic core
(list -> decode -> predict -> [finalize] -> write).

- `default_prompt`: the question asked when the input row has none (`--prompt` overrides it).
- `extra_fields`: task columns written after the standard ones (RSVQA: `question_type`,
  `ground_truth`, `correct`; OCR: `page`).
- `expand`: decode hook for inputs that yield several rows (PDF / multi-page TIFF pages).
- `finalize`: a CPU function over each predicted batch that fills the task columns (scoring).
- `key_columns`: what makes an output row unique; resume skips inputs whose keys are written.
- `extensions`: file name endings listed from folders and globs (None: the image extensions).
- `report`: the task's summary of a finished output (RSVQA: accuracy per question type; OCR:
  CER/WER), which the jobs write beside the Parquet and print.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from pipeline.decode import Expand
from pipeline.predict import PREDICT_EXTRA_FIELDS


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

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a task needs a name (the `task` column)")
        if "id" not in self.key_columns:
            raise ValueError("task key_columns must include 'id'")


CAPTION = Task(
    name="caption",
    default_prompt="Describe this remote sensing image in detail.",
    extra_fields=PREDICT_EXTRA_FIELDS,  # selection_map for --save-overlays' heat map; tflops
)
