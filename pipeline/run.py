"""Assemble and run a job: list -> (resume) -> decode -> predict -> [finalize] -> write -> summary.

`JobConfig` holds every knob a job exposes; its field names are the CLI flags
(`batch_size` <-> `--batch-size`) and it validates itself with errors that name the flag.
`run(config)` needs a connected Ray (`ray.init()`), returns the `RunSummary` and writes it as
`_summary.json` beside the Parquet files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.columns import QUESTION, output_schema
from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeConfig, decode_batch
from pipeline.inputs import InputConfig, list_inputs
from pipeline.predict import DEMO_MODEL, KEEP_FREED_MEMORY_ENV, PredictConfig, Predictor
from pipeline.resume import done_keys, pending, prepare_output
from pipeline.storage import open_fs, to_uri
from pipeline.summary import RunSummary
from pipeline.tasks import CAPTION, Task
from pipeline.write import ParquetSink

logger = logging.getLogger(__name__)


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
    image_size: int = 1008  # the model's highres_size
    decode_rows_per_task: int = 8
    # Decode inside the model actors (Ray Data fuses the stages) instead of in CPU tasks: for
    # CPU-only clusters whose actors already keep every core busy, where it saves moving each
    # decoded image through the object store to a separate process.
    decode_in_actors: bool = False
    overrides: dict = field(default_factory=dict)  # model config fields (e.g. threshold)

    def __post_init__(self) -> None:
        if not str(self.output).strip():
            raise ValueError("--output must name a local folder or an object-storage URI")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if isinstance(self.actors, str):
            self.actors = parse_actors(self.actors)
        parse_actors(",".join(map(str, self.actors)))
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}")
        if self.memory_per_actor_gb < 0:
            raise ValueError(f"--memory-per-actor-gb must be >= 0, got {self.memory_per_actor_gb}")
        if self.decode_rows_per_task < 1:
            raise ValueError(
                f"--decode-rows-per-task must be >= 1, got {self.decode_rows_per_task}"
            )
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("--prompt must not be empty")
        # The stage configs validate the rest (--input, --limit, --mode, --max-pixels, ...).
        self.input_config(), self.decode_config(), self.predict_config()

    def input_config(self) -> InputConfig:
        if self.task.extensions is not None:
            return InputConfig(input=self.input, limit=self.limit,
                               extensions=self.task.extensions)
        return InputConfig(input=self.input, limit=self.limit)

    def decode_config(self) -> DecodeConfig:
        return DecodeConfig(
            image_size=self.image_size, max_pixels=self.max_pixels, expand=self.task.expand
        )

    def predict_config(self) -> PredictConfig:
        return PredictConfig(
            model=self.model,
            vision_tower=self.vision_tower,
            mode=self.mode,
            max_new_tokens=self.max_new_tokens,
            dtype=self.dtype,
            overrides=tuple(sorted(self.overrides.items())),
        )

    def resolved_gpus_per_actor(self) -> float:
        if self.gpus_per_actor is not None:
            return self.gpus_per_actor
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def check_cpu_budget(self) -> None:
        """CPU-only actors that take every CPU leave none for decoding: Ray would wait forever.
        Refuse that with a message naming the flags (GPU clusters keep CPUs beside GPUs)."""
        if self.resolved_gpus_per_actor() > 0:
            return
        cpus = ray.cluster_resources().get("CPU", 0)
        held = self.actors[1] * self.cpus_per_actor
        if cpus and held > cpus - 1:
            raise ValueError(
                f"--actors {self.actors[1]} x --cpus-per-actor {self.cpus_per_actor:g} would hold"
                f" {held:g} of the cluster's {cpus:g} CPUs, leaving less than one for the decode"
                " and write tasks; lower --actors or --cpus-per-actor")


def add_task_columns(inputs: pa.Table, task: Task, prompt: str | None) -> pa.Table:
    """`task` and `prompt` (the row's question, else the job's prompt) for every input."""
    default = prompt or task.default_prompt
    prompts = pa.array([default] * inputs.num_rows, pa.string())
    if QUESTION in inputs.column_names:
        prompts = pc.coalesce(inputs.column(QUESTION), prompts)
    for name, column in (("task", pa.array([task.name] * inputs.num_rows)), ("prompt", prompts)):
        if name in inputs.column_names:
            inputs = inputs.drop_columns([name])
        inputs = inputs.append_column(name, column)
    return inputs


def drop_written(batch: pa.Table, done: pa.Table, key_columns: tuple[str, ...]) -> pa.Table:
    """Resume filter for tasks keyed after decode (e.g. `id` + `page`)."""
    return pending(batch, done, key_columns)


def build_dataset(config: JobConfig, todo: pa.Table, done: pa.Table | None = None):
    """The lazy Ray Dataset for `todo` (the inputs still to run)."""
    task = config.task
    n = config.decode_rows_per_task
    gpus = config.resolved_gpus_per_actor()
    actor_args = {
        "num_cpus": config.cpus_per_actor,
        "num_gpus": gpus,
        "memory": int(config.memory_per_actor_gb * 1024**3) or None,
    }
    if not gpus:  # the model runs on CPU: its buffers' memory is kept for reuse
        actor_args["runtime_env"] = {"env_vars": KEEP_FREED_MEMORY_ENV}
    # Ray Data fuses a task stage into the actor stage after it when both ask for the same
    # resources. By default decode asks for other ones (a whole CPU, no memory reservation, no
    # runtime_env), so it runs in parallel tasks while the actors generate.
    # With --decode-in-actors the stages before predict ask for the actors' very resources,
    # which is what lets Ray Data fuse them into the actor operator.
    stage_args = actor_args if config.decode_in_actors else {"num_cpus": 1}
    ds = ray.data.from_arrow([todo.slice(i, n) for i in range(0, todo.num_rows, n)])
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"config": config.decode_config()},
        batch_size=None,  # one block (decode_rows_per_task inputs) per call
        batch_format="pyarrow",
        udf_modifying_row_count=task.expand is not None,
        **stage_args,
    )
    if done is not None and done.num_rows:
        ds = ds.map_batches(
            drop_written,
            fn_kwargs={"done": done, "key_columns": task.key_columns},
            batch_size=None,
            batch_format="pyarrow",
            **stage_args,
        )
    low, high = config.actors
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"config": config.predict_config()},
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
        udf_modifying_row_count=False,
        **actor_args,
    )
    if task.finalize is not None:
        ds = ds.map_batches(
            task.finalize, batch_size=None, batch_format="pyarrow", udf_modifying_row_count=False
        )
    return ds


def run(config: JobConfig) -> RunSummary:
    """Run the job to completion; rerunning with the same output only does what is missing."""
    start = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    config.check_cpu_budget()
    task = config.task
    prepare_output(config.output, config.overwrite)
    inputs = add_task_columns(list_inputs(config.input_config()), task, config.prompt)
    done = done_keys(config.output, task.key_columns, task.name)
    keyed_at_listing = task.key_columns == ("id",)
    todo = pending(inputs, done) if keyed_at_listing else inputs
    skipped = inputs.num_rows - todo.num_rows if keyed_at_listing else done.num_rows
    logger.info("%d inputs, %d already written, %d to run", inputs.num_rows, skipped,
                todo.num_rows)
    stats: dict = {}
    if todo.num_rows:
        sink = ParquetSink(config.output, output_schema(task.extra_fields), task.key_columns)
        build_dataset(config, todo, None if keyed_at_listing else done).write_datasink(sink)
        stats = sink.stats or {}
    summary = RunSummary.from_stats(
        stats,
        elapsed_s=time.perf_counter() - start,
        task=task.name,
        model=", ".join(stats.get("models", [])) or config.model,
        output=to_uri(*open_fs(config.output)),
        rows_listed=inputs.num_rows,
        rows_skipped=skipped,
        started_at=started_at,
    )
    summary.write()
    return summary
