"""Assemble and run a job: list -> resume -> the processor's stages (prompt -> decode ->
[resume filter] -> predict -> [finalize]) -> the sink's write stage -> summary.

`JobConfig` holds what a job adds to the model stage (input, output, how the output is
written) and that stage's `ProcessorConfig`; its keywords are the jobs' flags (`batch_size`
<-> `--batch-size`, `actors` <-> `--actors`) and its errors name them. `run(config)` needs a
connected Ray (`ray.init()`), returns the `RunSummary` and writes it as `_summary.json`
beside the Parquet files.

`run()` builds its processor from `model_stages` (no split stage unless --decode-in-actors: it
hands over blocks already cut, see below), inserts the resume filter after decode for tasks keyed after it, appends the
write stage and applies the list.

Scale: a manifest of more than one listing block (keyed by id, no --limit) is listed in the cluster by Ray Data read tasks
(`pipeline.listing`), which drop the ids already written as they read: the driver holds no
per-input state. Other inputs (folders, globs, --limit, tasks keyed after decode) are listed
by the driver into the object store in blocks of `pipeline.inputs.LISTING_BLOCK_ROWS` rows and
filtered by Ray tasks (`pipeline.resume`). Either way a large block is one decode task that
hands on `decode_rows_per_task` rows at a time; a job of at most one listing block is cut into
decode-sized blocks so that it decodes in parallel. Answers go to Parquet through the sink's
buffer (`pipeline.write`): the first at once, then every `rows_per_file` rows or
`flush_seconds`, whichever comes first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import ray
from ray.data.datasource.datasink import WriteResult

from pipeline import inputs
from pipeline.columns import output_schema
from pipeline.inputs import InputConfig, iter_inputs
from pipeline.listing import large_manifest, read_manifest_inputs
from pipeline.processor import (
    Processor,
    ProcessorConfig,
    SplitStage,
    Stage,
    add_task_columns,
    build_processor,
    model_stages,
)
from pipeline.raster import parse_numbers
from pipeline.resume import DoneKeys, drop_done_blocks, drop_written, prepare_output
from pipeline.storage import open_fs, to_uri
from pipeline.summary import RunSummary
from pipeline.tasks import chipped
from pipeline.write import DEFAULT_FLUSH_SECONDS, ParquetSink

logger = logging.getLogger(__name__)

__all__ = ["JobConfig", "add_task_columns", "build_dataset", "parse_actors", "run"]

# The write asks for no CPU. Ray Data's resource allocator reserves CPUs for operators from
# upstream down (ReservationOpResourceAllocator): decode's tasks and the model actors took both
# CPUs of a 2-CPU machine, so a write that asked for any CPU had no budget until decode had
# finished every input (docs/DESIGN.md, "Durable writes"). It runs in one actor rather than in
# tasks: a 0-CPU task runs beside decode in a worker process of its own, past Ray's soft limit
# of one worker per CPU, and Ray ends such a worker after a second idle, so every few writes
# paid for a new Python process (and decode with them).
WRITE_ARGS = {"num_cpus": 0}
DECODED_BLOCK_CAP = 128 * 1024**2  # Ray Data's own default target block size
MAX_ROWS_PER_FILE = 500  # automatic --rows-per-file: at most this many rows per Parquet file
FILES_PER_RUN = 100  # ... and about this many files for smaller runs (at least a batch each)


def parse_actors(text: str) -> tuple[int, int]:
    """`--actors MIN[,MAX]` -> (MIN, MAX)."""
    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise ValueError(f"--actors must be MIN or MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[1]


def _processor_name(name: str) -> str:
    """A job's name for a processor field -> the field: the jobs say actor where the
    processor says replica (`actors` is `concurrency`, `gpus_per_actor` `gpus_per_replica`)."""
    return "concurrency" if name == "actors" else name.replace("_per_actor", "_per_replica")


@dataclass(init=False)
class JobConfig:
    """A job: where its inputs and outputs are, how its output is written, and the
    `ProcessorConfig` of the model stage.

    `JobConfig(input=..., output=..., processor=ProcessorConfig(...))`, or the processor's
    fields given loose under the jobs' names (`batch_size=8, actors=(1, 4),
    gpus_per_actor=1`), as the job scripts pass their parsed flags; those names read back too
    (`config.actors` is `config.processor.concurrency`)."""

    input: str
    output: str
    processor: ProcessorConfig
    limit: int | None = None
    overwrite: bool = False
    rows_per_file: int | None = None  # None: about 1% of the rows to run, 1 batch to 500
    flush_seconds: float = DEFAULT_FLUSH_SECONDS  # the longest an answer waits to be written
    max_error_fraction: float = 1.0  # the job fails (exit 1) above this share of error rows
    asset: str | None = None  # STAC input: the asset to read (default: visual, else the first)

    def __init__(self, input: str, output: str, processor: ProcessorConfig | None = None,
                 **values: Any):
        self.input, self.output = input, output
        for f in dataclasses.fields(self):
            if f.name not in ("input", "output", "processor"):
                setattr(self, f.name, values.pop(f.name, f.default))
        if processor is not None and values:
            raise TypeError(f"JobConfig takes a processor or its fields, not both: {values}")
        if processor is None:
            actors = values.pop("actors", (1, 1))
            values["concurrency"] = parse_actors(
                ",".join(map(str, actors)) if isinstance(actors, tuple | list) else actors)
            processor = ProcessorConfig(**{_processor_name(k): v
                                           for k, v in _raster_values(values).items()})
        self.processor = processor
        self._validate()

    def _validate(self) -> None:
        processor = self.processor
        if processor.chip_size is not None and processor.task.expand is None:  # resume per chip
            self.processor = dataclasses.replace(processor, task=chipped(processor.task))
        if not str(self.output).strip():
            raise ValueError("--output must name a local folder or an object-storage URI")
        if self.rows_per_file is not None and self.rows_per_file < 1:
            raise ValueError(f"--rows-per-file must be >= 1, got {self.rows_per_file}")
        if not self.flush_seconds > 0:
            raise ValueError(f"--flush-seconds must be > 0, got {self.flush_seconds}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(
                f"--max-error-fraction must be between 0 and 1, got {self.max_error_fraction}")
        self.input_config()  # --input, --limit

    def __getattr__(self, name: str) -> Any:
        processor = self.__dict__.get("processor")
        if processor is None or name.startswith("_"):
            raise AttributeError(name)
        try:
            return getattr(processor, _processor_name(name))
        except AttributeError:
            raise AttributeError(f"JobConfig has no attribute {name!r}") from None

    @classmethod
    def keywords(cls) -> set[str]:
        """The keywords `JobConfig(...)` takes besides `processor`."""
        processor = {"actors" if f.name == "concurrency"
                     else f.name.replace("_per_replica", "_per_actor")
                     for f in dataclasses.fields(ProcessorConfig)}
        return {f.name for f in dataclasses.fields(cls)} - {"processor"} | processor

    def input_config(self) -> InputConfig:
        extensions = self.processor.task.extensions
        if extensions is not None:
            return InputConfig(input=self.input, limit=self.limit, extensions=extensions,
                               asset=self.asset)
        return InputConfig(input=self.input, limit=self.limit, asset=self.asset)

    def resolved_rows_per_file(self, rows_to_run: int) -> int:
        if self.rows_per_file is not None:
            return self.rows_per_file
        return min(MAX_ROWS_PER_FILE, max(self.processor.batch_size,
                                          rows_to_run // FILES_PER_RUN))


def _raster_values(values: dict[str, Any]) -> dict[str, Any]:
    """`--bands 4,3,2` and `--stretch 2,98` given as text, parsed (errors name the flag)."""
    values = dict(values)
    if isinstance(values.get("bands"), str):
        values["bands"] = parse_numbers(values["bands"], "--bands", int)
    if isinstance(values.get("stretch"), str):
        values["stretch"] = parse_numbers(values["stretch"], "--stretch", float)
        if len(values["stretch"]) != 2:
            raise ValueError(f"--stretch must be LOW,HIGH, got {values['stretch']}")
    return values


def put_inputs(config: InputConfig, opened: inputs.Source | None = None) -> tuple[list, int]:
    """List the inputs into the object store, one large block at a time: (refs, rows);
    `opened`: `--input` already opened (`pipeline.inputs.open_source`)."""
    refs, rows = [], 0
    for block in iter_inputs(config, opened=opened):
        refs.append(ray.put(block))
        rows += block.num_rows
    return refs, rows


def cut_table(table: pa.Table, rows: int) -> list[pa.Table]:
    """`table` as tables of `rows` rows, each a copy (a slice would carry, and serialize,
    the whole table's buffers)."""
    return [table.take(pa.array(range(start, min(start + rows, table.num_rows))))
            for start in range(0, table.num_rows, rows)]


def done_keys(output: str, key_columns: tuple[str, ...], task: str) -> DoneKeys:
    """The keys already written under `output`, read and kept in the cluster."""
    return DoneKeys.collect(output, key_columns, task)


def resume_stage(processor: Processor, done: pa.Table | DoneKeys | None) -> Processor:
    """`processor` with the resume filter after decode when `done` holds keys (tasks keyed
    after decode): it asks for decode's resources, so that it runs where decode runs."""
    ref = done.ref if isinstance(done, DoneKeys) else (
        ray.put(done) if done is not None and done.num_rows else None)
    if ref is None:
        return processor
    return processor.insert(Stage(
        "resume", drop_written,
        {"fn_kwargs": {"done": ref, "key_columns": processor.config.task.key_columns},
         "batch_size": None, "batch_format": "pyarrow"},
        processor.stage("decode").ray_remote_args), after="decode")


@dataclass
class WriteStage:
    """The sink: one long-lived writer actor (WRITE_ARGS: no CPU) hands each block to the
    sink's buffer (`ParquetSink.start()`) as Ray Data's write tasks would. The stage runs the
    dataset and completes the sink (`on_write_complete`, or `on_write_failed` before the job's
    error is raised)."""

    sink: ParquetSink
    max_block_bytes: int  # decoded blocks' size cap, set on the dataset before it runs
    ray_remote_args: dict = field(default_factory=lambda: dict(WRITE_ARGS))
    name: str = "write"

    def __call__(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        # Blocks of decode_rows_per_task decoded images: Ray Data's default (128 MiB) would
        # put ~40 of them in a block, and an actor answers a block's rows before it hands any
        # of them on; with a block a batch, answers reach the write one batch at a time.
        ds.context.target_max_block_size = min(
            ds.context.target_max_block_size or DECODED_BLOCK_CAP, self.max_block_bytes)
        sink = self.sink
        sink.on_write_start()
        written = ds.map_batches(
            _SinkWriter, fn_constructor_args=(sink,), batch_size=None, batch_format="pyarrow",
            zero_copy_batch=True, compute=ray.data.ActorPoolStrategy(size=1),
            **self.ray_remote_args)
        parts, rows = [], 0
        try:
            for batch in written.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows += sum(batch.column("rows").to_pylist())
                parts += [json.loads(s) for s in batch.column("stats").to_pylist()]
        except Exception as exc:
            sink.on_write_failed(exc)
            raise
        sink.on_write_complete(WriteResult(num_rows=rows, size_bytes=0, write_returns=parts))
        return ds


class _SinkWriter:
    """The write stage's actor: `ParquetSink.write` on each block, as a write task would; a
    one-row table of what it wrote comes back to the driver."""

    def __init__(self, sink: ParquetSink) -> None:
        self.sink = sink

    def __call__(self, block: pa.Table) -> pa.Table:
        stats = self.sink.write([block], None)
        return pa.table({"rows": [block.num_rows], "stats": [json.dumps(stats)]})


def build_dataset(config: JobConfig, todo, done: pa.Table | DoneKeys | None = None):
    """The lazy Ray Dataset of `build_processor`'s stages (the split included) over `todo`
    (the inputs still to run: a table or a Dataset), with the resume filter when `done`
    holds keys (tasks keyed after decode)."""
    ds = ray.data.from_arrow(todo) if isinstance(todo, pa.Table) else todo
    return resume_stage(build_processor(config.processor), done)(ds)


def _listed_inputs(config: JobConfig, done: DoneKeys):
    """(Dataset of the inputs to run, rows listed, rows skipped, rows to run); the counts are
    None when the listing streams (`pipeline.listing`: a manifest, keyed by id, no --limit),
    and then come from `listing.totals()` after the run (the fifth element, else None)."""
    task, processor = config.processor.task, config.processor
    keyed_at_listing = task.key_columns == ("id",)
    opened = inputs.open_source(config.input_config())  # a folder is listed here, once
    files = opened.manifest_files
    if files and keyed_at_listing and config.limit is None and large_manifest(list(files)):
        ds, source = read_manifest_inputs(list(files), done.ref, "id")
        return ds, None, None, None, source
    blocks, listed = put_inputs(config.input_config(), opened)
    if keyed_at_listing:
        blocks, to_run = drop_done_blocks(blocks, listed, done)
        skipped = listed - to_run
    else:
        to_run, skipped = listed, done.rows
    # A job of more than one listing block decodes each block in one task, a few rows at a
    # time (Ray Data's streaming repartition into small blocks can hold the CPUs decode needs:
    # it never wrote a row at 1e6 inputs on 2 CPUs). A smaller job (at most one listing
    # block's rows) is cut into decode-sized blocks here, so that its few rows still decode in
    # parallel; `from_blocks` reads their row counts and schema on this process, where
    # `from_arrow_refs` runs a Ray task per block for them.
    if to_run <= inputs.LISTING_BLOCK_ROWS:
        small = [t for ref in blocks for t in cut_table(ray.get(ref),
                                                         processor.decode_rows_per_task)]
        ds = ray.data.from_blocks(small) if small else None
    else:
        ds = ray.data.from_arrow_refs(blocks)
    return ds, listed, skipped, to_run, None


def run(config: JobConfig) -> RunSummary:
    """Run the job to completion; rerunning with the same output only does what is missing."""
    start = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    task = config.processor.task
    # With --decode-in-actors decode runs in the actor task that answers a block, which hands
    # on no answer before its whole block is done: blocks are cut to decode_rows_per_task
    # rows first (the split stage, a task stage of its own beside the actors). Without it a
    # decode task hands on rows as it goes, and run() leaves the split out.
    split = [SplitStage(config.processor.decode_rows_per_task)] \
        if config.processor.decode_in_actors else []
    processor = Processor(config.processor, [*split, *model_stages(config.processor)])
    processor.resolve()  # GPUs 'auto' and the CPU budget, before anything is listed
    prepare_output(config.output, config.overwrite)
    done = done_keys(config.output, task.key_columns, task.name)
    ds, listed, skipped, to_run, streamed = _listed_inputs(config, done)
    if streamed is None:
        logger.info("%d inputs, %d already written, %d to run", listed, skipped, to_run)
    else:
        logger.info("listing %s in the cluster, %d already written", config.input, done.rows)
    stats: dict = {}
    if ds is not None:
        rows_per_file = config.resolved_rows_per_file(to_run or 0) if to_run is not None \
            else config.rows_per_file or MAX_ROWS_PER_FILE
        sink = ParquetSink(config.output, output_schema(task.extra_fields), task.key_columns,
                           rows_per_file=rows_per_file,
                           flush_seconds=config.flush_seconds,
                           file_metadata=task.file_metadata).start()
        if task.key_columns != ("id",):  # keyed after decode: not filtered at listing
            resume_stage(processor, done)
        rows, side = config.processor.decode_rows_per_task, config.processor.image_size
        processor.insert(WriteStage(sink, max_block_bytes=rows * side ** 2 * 3))
        processor(ds)
        stats = sink.stats or {}
    if streamed is not None:
        listed, skipped, repeated = streamed.totals()
        logger.info("%d inputs, %d already written, %d run", listed, skipped, listed - skipped)
        if not listed:
            raise ValueError(f"--input {config.input!r}: the manifest has no rows")
        if repeated:
            raise ValueError(
                f"--input manifest {config.input!r}: {repeated} ids appear in more than one "
                "manifest file (duplicate ids); each was answered once per file")
    summary = RunSummary.from_stats(
        stats,
        elapsed_s=time.perf_counter() - start,
        task=task.name,
        model=", ".join(stats.get("models", [])) or config.processor.model,
        output=to_uri(*open_fs(config.output)),
        rows_listed=listed,
        rows_skipped=skipped,
        started_at=started_at,
    )
    summary.write()
    return summary
