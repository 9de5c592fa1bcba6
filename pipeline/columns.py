"""Column names, the output schema, and the checks every stage runs on its input.

The output schema (docs/DESIGN.md section 5) is fixed: every row of every job carries these columns,
in this order; task-specific columns (RSVQA's `correct`, OCR's `page`) come after them.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

# Columns that only live inside the pipeline (never written).
IMAGE = "image"  # uint8 [S, S, 3] padded + resized image, a Ray tensor column
QUESTION = "question"  # manifest question (VQA); `prompt` falls back to the job's prompt
GROUND_TRUTH = "ground_truth"

# Error stages, in pipeline order. A row that failed keeps the first stage that failed it.
STAGES = ("read", "decode", "predict", "write")

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("task", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("model", pa.string()),
        pa.field("width", pa.int32()),  # original width, after EXIF orientation
        pa.field("height", pa.int32()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("generated_tokens", pa.int32()),
        pa.field("hr_selected_per_layer", pa.list_(pa.int32())),  # per FlexAttention layer
        pa.field("hr_selected_frac", pa.float64()),  # mean over the whole generation
        pa.field("hr_cells", pa.list_(pa.bool_())),  # union of selected 9x9 cells, row-major
        pa.field("prefill_ms", pa.float64()),
        pa.field("decode_ms", pa.float64()),
        pa.field("error", pa.string()),
        pa.field("error_stage", pa.string()),
    ]
)

# What predict adds to a row (a subset of OUTPUT_SCHEMA).
PREDICTION_FIELDS = [
    OUTPUT_SCHEMA.field(name)
    for name in (
        "answer",
        "model",
        "prompt_tokens",
        "generated_tokens",
        "hr_selected_per_layer",
        "hr_selected_frac",
        "hr_cells",
        "prefill_ms",
        "decode_ms",
    )
]

MAX_ERROR_CHARS = 500


class MissingColumnsError(ValueError):
    """A stage got a batch without the columns it needs: a wiring bug, so the job stops."""


def schema_fields(**types: pa.DataType) -> tuple[pa.Field, ...]:
    """Nullable fields in the order given: ``schema_fields(cer=pa.float64(), ...)``."""
    return tuple(pa.field(name, kind) for name, kind in types.items())


def require_columns(stage: str, table: pa.Table, required: Iterable[str]) -> None:
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise MissingColumnsError(
            f"stage {stage!r}: input is missing required column(s) {missing}; "
            f"it has {table.column_names}"
        )


def output_schema(extra_fields: Iterable[pa.Field] = ()) -> pa.Schema:
    """The written schema: OUTPUT_SCHEMA followed by a task's own columns."""
    schema = OUTPUT_SCHEMA
    for field in extra_fields:
        if field.name in schema.names:
            raise ValueError(f"task column {field.name!r} clashes with an output column")
        schema = schema.append(field)
    return schema


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table` to `schema`: missing nullable columns become nulls."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            raise MissingColumnsError(f"stage 'write': column {field.name!r} is required")
    return pa.Table.from_arrays(columns, schema=schema)


def format_error(exc: BaseException) -> str:
    """`Type: message`, one line, bounded; never includes the environment or credentials."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").strip()
    return text[:MAX_ERROR_CHARS]
