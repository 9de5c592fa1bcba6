"""Assemble and run a job: list -> resume -> the processor (decode -> predict -> [finalize]) ->
write -> summary.

`JobConfig` holds every knob a job exposes; its field names are the CLI flags
(`batch_size` <-> `--batch-size`) and it validates itself with errors that name the flag.
`run(config)` needs a connected Ray (`ray.init()`), returns the `RunSummary` and writes it as
`_summary.json` beside the Parquet files.

Scale: a manifest (keyed by id, no --limit) is listed in the cluster by Ray Data read tasks
(`pipeline.listing`), which drop the ids already written as they read: the driver holds no
per-input state. Other inputs (folders, globs, --limit, tasks keyed after decode) are listed
by the driver into the object store in blocks of `pipeline.inputs.LISTING_BLOCK_ROWS` rows and
filtered by Ray tasks (`pipeline.resume`). Either way a large block is one decode task that
hands on `decode_rows_per_task` rows at a time, and the first rows are cut into decode-sized
blocks so that a small job decodes in parallel. Answers go to Parquet through the sink's
buffer (`pipeline.write`): the first at once, then every `rows_per_file` rows or
`flush_seconds`, whichever comes first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import ray

from flexattn.options import DEFAULT_HIGHRES_SIZE
from pipeline import inputs
from pipeline.columns import output_schema
from pipeline.decode import DEFAULT_MAX_PIXELS
from pipeline.inputs import InputConfig, iter_inputs
from pipeline.listing import large_manifest, manifest_files, read_manifest_inputs
from pipeline.predict import DEMO_MODEL
from pipeline.processor import DEFAULT_STRETCH, Processor, ProcessorConfig, add_task_columns
from pipeline.raster import parse_numbers
from pipeline.resume import DoneKeys, drop_done_blocks, drop_written, prepare_output
from pipeline.storage import open_fs, to_uri
from pipeline.summary import RunSummary
from pipeline.tasks import CAPTION, Task, chipped
from pipeline.write import DEFAULT_FLUSH_SECONDS, ParquetSink

logger = logging.getLogger(__name__)

__all__ = ["JobConfig", "add_task_columns", "build_dataset", "parse_actors", "run"]

# The write tasks ask for no CPU. Ray Data's resource allocator reserves CPUs for operators
# from upstream down (ReservationOpResourceAllocator): decode's tasks and the model actors took
# both CPUs of a 2-CPU machine, so a write that asked for any CPU had no budget until decode
# had finished every input (docs/DESIGN.md, "Durable writes"). A write is I/O, and one at a
# time keeps Ray from starting a worker per write.
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


@dataclass
class JobConfig:
    input: str
    output: str
    task: Task = CAPTION
    prompt: str | None = None  # default: the task's prompt; a manifest `question` wins per row
    model: str = DEMO_MODEL
    vision_tower: str | None = None
    mode: str = "flexattn"
    dtype: str | None = None
    batch_size: int = 4  # rows per generate() call on an actor
    actors: tuple[int, int] = (1, 1)  # autoscaling actor pool MIN, MAX
    gpus_per_actor: float | None = None  # None: 1 if the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    memory_per_actor_gb: float = 2.0  # host memory reserved per replica
    max_new_tokens: int = 64
    limit: int | None = None
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_size: int = DEFAULT_HIGHRES_SIZE  # the model's highres_size
    decode_rows_per_task: int = 8
    # Decode inside the model actors (Ray Data fuses the stages) instead of in CPU tasks: for
    # CPU-only clusters whose actors already keep every core busy, where it saves moving each
    # decoded image through the object store to a separate process.
    decode_in_actors: bool = False
    overrides: dict = field(default_factory=dict)  # run-time model options (e.g. threshold)
    rows_per_file: int | None = None  # None: about 1% of the rows to run, 1 batch to 500
    flush_seconds: float = DEFAULT_FLUSH_SECONDS  # the longest an answer waits to be written
    max_error_fraction: float = 1.0  # the job fails (exit 1) above this share of error rows
    # Remote-sensing scenes (pipeline/raster.py, ProcessorConfig's fields of the same names);
    # `bands` and `stretch` may be given as "4,3,2" and "2,98". STAC input: `asset`.
    chip_size: int | None = None
    chip_overlap: int = 0
    gsd: float | None = None
    bands: tuple[int, ...] | None = None
    stretch: tuple[float, float] = DEFAULT_STRETCH
    asset: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bands, str):
            self.bands = parse_numbers(self.bands, "--bands", int)
        if isinstance(self.stretch, str):
            self.stretch = parse_numbers(self.stretch, "--stretch", float)
            if len(self.stretch) != 2:
                raise ValueError(f"--stretch must be LOW,HIGH, got {self.stretch}")
        if self.chip_size is not None and self.task.expand is None:
            self.task = chipped(self.task)  # resume per chip
        if not str(self.output).strip():
            raise ValueError("--output must name a local folder or an object-storage URI")
        if isinstance(self.actors, str):
            self.actors = parse_actors(self.actors)
        parse_actors(",".join(map(str, self.actors)))
        if self.rows_per_file is not None and self.rows_per_file < 1:
            raise ValueError(f"--rows-per-file must be >= 1, got {self.rows_per_file}")
        if not self.flush_seconds > 0:
            raise ValueError(f"--flush-seconds must be > 0, got {self.flush_seconds}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(
                f"--max-error-fraction must be between 0 and 1, got {self.max_error_fraction}")
        # The stage configs validate the rest (--input, --limit, --batch-size, --mode, ...).
        self.input_config(), self.processor_config()

    def input_config(self) -> InputConfig:
        if self.task.extensions is not None:
            return InputConfig(input=self.input, limit=self.limit,
                               extensions=self.task.extensions, asset=self.asset)
        return InputConfig(input=self.input, limit=self.limit, asset=self.asset)

    def processor_config(self) -> ProcessorConfig:
        return ProcessorConfig(
            model=self.model, vision_tower=self.vision_tower, mode=self.mode, dtype=self.dtype,
            batch_size=self.batch_size, concurrency=tuple(self.actors),
            gpus_per_replica=self.gpus_per_actor, cpus_per_replica=self.cpus_per_actor,
            memory_per_replica_gb=self.memory_per_actor_gb,
            max_new_tokens=self.max_new_tokens, overrides=dict(self.overrides),
            prompt=self.prompt, task=self.task, image_size=self.image_size,
            max_pixels=self.max_pixels, decode_rows_per_task=self.decode_rows_per_task,
            decode_in_actors=self.decode_in_actors, chip_size=self.chip_size,
            chip_overlap=self.chip_overlap, gsd=self.gsd, bands=self.bands,
            stretch=tuple(self.stretch))

    def decode_config(self):
        return self.processor_config().decode_config()

    def predict_config(self):
        return self.processor_config().predict_config()

    def resolved_gpus_per_actor(self) -> float:
        return self.processor_config().resolved_gpus_per_replica()

    def check_cpu_budget(self) -> None:
        """Refuse CPU-only actors that would take every CPU (see ProcessorConfig)."""
        self.processor_config().check_cpu_budget()

    def resolved_rows_per_file(self, rows_to_run: int) -> int:
        if self.rows_per_file is not None:
            return self.rows_per_file
        return min(MAX_ROWS_PER_FILE, max(self.batch_size, rows_to_run // FILES_PER_RUN))


def put_inputs(config: InputConfig) -> tuple[list, int]:
    """List the inputs into the object store, one large block at a time: (refs, rows)."""
    refs, rows = [], 0
    for block in iter_inputs(config):
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


def build_dataset(config: JobConfig, todo, done: pa.Table | DoneKeys | None = None,
                  split_blocks: bool = True):
    """The lazy Ray Dataset for `todo` (the inputs still to run: a table or a Dataset); `done`
    filters rows after decode, for tasks keyed after it. `split_blocks`: see `Processor`."""
    ds = ray.data.from_arrow(todo) if isinstance(todo, pa.Table) else todo
    ref = done.ref if isinstance(done, DoneKeys) else (
        ray.put(done) if done is not None and done.num_rows else None)
    after = None
    if ref is not None:
        after = (drop_written, {"done": ref, "key_columns": config.task.key_columns})
    return Processor(config.processor_config(), after_decode=after,
                     split_blocks=split_blocks)(ds)


def _listed_inputs(config: JobConfig, done: DoneKeys):
    """(Dataset of the inputs to run, rows listed, rows skipped, rows to run); the counts are
    None when the listing streams (`pipeline.listing`: a manifest, keyed by id, no --limit),
    and then come from `listing.totals()` after the run (the fifth element, else None)."""
    task = config.task
    keyed_at_listing = task.key_columns == ("id",)
    files = manifest_files(config.input_config()) if keyed_at_listing and config.limit is None \
        else None
    if files is not None and large_manifest(files):
        ds, source = read_manifest_inputs(files, done.ref, "id")
        return ds, None, None, None, source
    blocks, listed = put_inputs(config.input_config())
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
                                                         config.decode_rows_per_task)]
        ds = ray.data.from_blocks(small) if small else None
    else:
        ds = ray.data.from_arrow_refs(blocks)
    return ds, listed, skipped, to_run, None


def run(config: JobConfig) -> RunSummary:
    """Run the job to completion; rerunning with the same output only does what is missing."""
    start = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    config.check_cpu_budget()
    task = config.task
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
        keyed_after_decode = task.key_columns != ("id",)
        # With --decode-in-actors decode runs in the actor task that answers a block, which
        # hands on no answer before the whole block is done: its blocks are cut to
        # decode_rows_per_task rows first (the processor's streaming repartition, a task
        # stage of its own beside the actors). Decode tasks hand on rows as they go.
        ds = build_dataset(config, ds, done if keyed_after_decode else None,
                           split_blocks=config.decode_in_actors)
        # Blocks of decode_rows_per_task decoded images: Ray Data's default (128 MiB) would
        # put ~40 of them in a block, and an actor answers a block's rows before it hands any
        # of them on; with a block a batch, answers reach the write one batch at a time.
        ds.context.target_max_block_size = min(
            ds.context.target_max_block_size or DECODED_BLOCK_CAP,
            config.decode_rows_per_task * config.image_size ** 2 * 3)
        # The write asks for no CPU (WRITE_ARGS) and hands its rows to the sink's buffer.
        ds.write_datasink(sink, concurrency=1, ray_remote_args=dict(WRITE_ARGS))
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
        model=", ".join(stats.get("models", [])) or config.model,
        output=to_uri(*open_fs(config.output)),
        rows_listed=listed,
        rows_skipped=skipped,
        started_at=started_at,
    )
    summary.write()
    return summary
