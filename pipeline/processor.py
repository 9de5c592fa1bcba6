"""The model stage as a Ray Data processor, in the style of `ray.data.llm`: a config,
`build_processor(config, preprocess=None, postprocess=None)`, and a callable from Dataset to
Dataset that drops into a user's own Ray Data pipeline.

    processor = build_processor(
        ProcessorConfig(model="s3://bucket/models/7b", concurrency=(1, 8), batch_size=8),
        preprocess=lambda row: {**row, "prompt": f"Is there a {row['object']} here?"},
        postprocess=lambda row: {"id": row["id"], "answer": row["answer"]},
    )
    processor(ray.data.read_parquet("s3://bucket/catalogue/")).write_parquet("s3://bucket/out/")

Input rows carry the image as `image`: encoded file bytes (binary), a path or URI (string), or
an already decoded array (uint8 H x W x 3, H x W or H x W x 4; other dtypes are min-max
stretched); rows without `image` are read from `source_uri` (what `pipeline.run` lists). The
question is the row's `prompt`, else its `question`, else `config.prompt`, else the task's
default. Output rows keep the other input columns and add `task`, `prompt`, `width`,
`height`, the prediction columns of the output schema (`answer`, `model`, token counts,
selection statistics, timings, `selection_map`, `tflops`) and `error` / `error_stage`: a row
whose image cannot be read or decoded, or whose generation fails, is an error row and the
rest go on.

Stages, in the manner of `ray.data.llm`: a `Processor` is a list of stage objects, each
carrying its own `map_batches` and resource arguments, applied in order between the optional
`preprocess` and `postprocess`. `build_processor` lists split (blocks of
`decode_rows_per_task` rows, cut in the cluster as they stream) -> prompt -> decode (CPU
tasks) -> predict (an autoscaling pool of actors, one model replica each) -> [the task's
finalize]. `run()` lists the same stages without the split (it hands over blocks already
cut), puts its resume filter after decode for tasks keyed after it, and appends its sink; a
user adds a stage the same way (`Processor.insert`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from flexattn.options import DEFAULT_HIGHRES_SIZE, checkpoint_highres_size
from pipeline.columns import QUESTION
from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeConfig, decode_batch, decode_stream
from pipeline.predict import DEMO_MODEL, KEEP_FREED_MEMORY_ENV, PredictConfig, Predictor
from pipeline.raster import RasterConfig
from pipeline.tasks import CAPTION, Task

Row = dict[str, Any]

# Each field's job flag, so that a bad value names both (`JobConfig` builds this config).
FLAGS = {
    "batch_size": "--batch-size", "concurrency": "--actors",
    "gpus_per_replica": "--gpus-per-actor", "cpus_per_replica": "--cpus-per-actor",
    "memory_per_replica_gb": "--memory-per-actor-gb",
    "decode_rows_per_task": "--decode-rows-per-task", "prompt": "--prompt",
    "image_size": "--image-size",
}
DEFAULT_STRETCH = (2.0, 98.0)


def _invalid(name: str, rule: str, value: object) -> ValueError:
    return ValueError(f"{name} ({FLAGS[name]}) must be {rule}, got {value!r}")


@dataclass(frozen=True)
class ProcessorConfig:
    model: str = DEMO_MODEL  # checkpoint directory, an object-storage URI of one, or "demo"
    vision_tower: str | None = None  # default: from the checkpoint's config
    mode: str = "flexattn"  # flexattn, lowres or fullres
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on CPU
    batch_size: int = 4  # rows per generate() call on a replica
    concurrency: int | tuple[int, int] = 1  # replicas: n, or (min, max) to autoscale
    gpus_per_replica: float | None = None  # None: 1 if the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    memory_per_replica_gb: float = 2.0  # host memory reserved per replica
    max_new_tokens: int = 64
    overrides: Mapping[str, object] = field(default_factory=dict)  # run-time model options (threshold, ...)
    prompt: str | None = None  # for rows without one (default: the task's)
    task: Task = CAPTION
    image_size: int = DEFAULT_HIGHRES_SIZE  # the model's highres_size
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images become error rows
    decode_rows_per_task: int = 8
    # Decode inside the model actors (Ray Data fuses the stages): for CPU-only clusters whose
    # actors keep every core busy; it saves moving each decoded image through the object store.
    decode_in_actors: bool = False
    # Remote-sensing scenes (pipeline/raster.py): GeoTIFF / COG / JPEG2000 read with rasterio
    # (windowed, bands, per-band stretch, nodata), chips at native resolution, georeferenced
    # columns. `rasters=False`: every file through Pillow, as before.
    rasters: bool = True
    chip_size: int | None = None  # None: a scene is one row, shrunk whole
    chip_overlap: int = 0
    gsd: float | None = None  # metres per pixel to resample georeferenced scenes to
    bands: tuple[int, ...] | None = None  # 1-based; None: red/green/blue, else the first three
    stretch: tuple[float, float] = DEFAULT_STRETCH  # per-band percentiles, above 8 bits

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise _invalid("batch_size", ">= 1", self.batch_size)
        low, high = self.pool_size
        if not 1 <= low <= high:
            raise _invalid("concurrency", "n or (min, max) with 1 <= min <= max",
                           self.concurrency)
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise _invalid("gpus_per_replica", ">= 0", self.gpus_per_replica)
        if self.cpus_per_replica <= 0:
            raise _invalid("cpus_per_replica", "> 0", self.cpus_per_replica)
        if self.memory_per_replica_gb < 0:
            raise _invalid("memory_per_replica_gb", ">= 0", self.memory_per_replica_gb)
        if self.decode_rows_per_task < 1:
            raise _invalid("decode_rows_per_task", ">= 1", self.decode_rows_per_task)
        if self.prompt is not None and not self.prompt.strip():
            raise _invalid("prompt", "a question, not blank", self.prompt)
        self.decode_config(), self.predict_config()  # --mode, --max-pixels, ...
        expected = (DEFAULT_HIGHRES_SIZE if self.model == DEMO_MODEL
                    else checkpoint_highres_size(self.model))
        if expected is not None and self.image_size != expected:
            raise _invalid("image_size", f"the model's highres_size, {expected}",
                           self.image_size)

    @property
    def pool_size(self) -> tuple[int, int]:
        """(min, max) replicas."""
        c = self.concurrency
        if isinstance(c, int) and not isinstance(c, bool):
            return c, c
        if isinstance(c, tuple | list) and len(c) == 2 and all(isinstance(v, int) for v in c):
            return int(c[0]), int(c[1])
        return 0, 0  # refused by __post_init__

    def raster_config(self) -> RasterConfig | None:
        """None for tasks with their own `expand` (OCR) or with `rasters=False`."""
        if not self.rasters or self.task.expand is not None:
            return None
        return RasterConfig(chip_size=self.chip_size, chip_overlap=self.chip_overlap,
                            gsd=self.gsd, bands=self.bands, stretch=tuple(self.stretch))

    def decode_config(self) -> DecodeConfig:
        return DecodeConfig(image_size=self.image_size, max_pixels=self.max_pixels,
                            expand=self.task.expand, raster=self.raster_config(),
                            rows_per_output=self.decode_rows_per_task)

    def predict_config(self) -> PredictConfig:
        return PredictConfig(model=self.model, vision_tower=self.vision_tower, mode=self.mode,
                             max_new_tokens=self.max_new_tokens, dtype=self.dtype,
                             overrides=tuple(sorted(dict(self.overrides).items())))

    def resolved_gpus_per_replica(self) -> float:
        """`gpus_per_replica`, or 1 when the connected cluster has GPUs, else 0."""
        if self.gpus_per_replica is not None:
            return self.gpus_per_replica
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def check_cpu_budget(self) -> None:
        """CPU-only replicas that take every CPU leave none for decoding: Ray would wait
        forever. Refuse that (GPU clusters keep CPUs beside their GPUs)."""
        if self.resolved_gpus_per_replica() > 0:
            return
        cpus = ray.cluster_resources().get("CPU", 0)
        high, per = self.pool_size[1], self.cpus_per_replica
        if cpus and high * per > cpus - 1:
            raise ValueError(
                f"--actors {high} x --cpus-per-actor {per:g} would hold {high * per:g} of the"
                f" cluster's {cpus:g} CPUs (concurrency x cpus_per_replica), leaving less than"
                " one for the decode tasks; lower --actors or --cpus-per-actor")

    def actor_args(self) -> dict[str, Any]:
        """Ray resources of one replica."""
        gpus = self.resolved_gpus_per_replica()
        args: dict[str, Any] = {
            "num_cpus": self.cpus_per_replica,
            "num_gpus": gpus,
            "memory": int(self.memory_per_replica_gb * 1024**3) or None,
        }
        if not gpus:  # the model runs on CPU: its buffers' memory is kept for reuse
            args["runtime_env"] = {"env_vars": KEEP_FREED_MEMORY_ENV}
        return args


def add_task_columns(inputs: pa.Table, task: Task, prompt: str | None) -> pa.Table:
    """`task` and `prompt` for every row: the row's `prompt`, else its `question`, else
    `prompt`, else the task's default."""
    n = inputs.num_rows
    prompts = pa.repeat(pa.scalar(prompt or task.default_prompt, pa.string()), n)
    for name in (QUESTION, "prompt"):  # the later wins
        if name in inputs.column_names:
            prompts = pc.coalesce(inputs.column(name).cast(pa.string()), prompts)
    for name, column in (("task", pa.repeat(pa.scalar(task.name, pa.string()), n)),
                         ("prompt", prompts)):
        if name in inputs.column_names:
            inputs = inputs.drop_columns([name])
        inputs = inputs.append_column(name, column)
    return inputs



class ReplicaArgs(Mapping[str, Any]):
    """The Ray resources of one model replica (`ProcessorConfig.actor_args`), asked of the
    cluster when first read and kept: 'auto' GPUs and the CPU budget check need a connected
    Ray, so a processor can be built before `ray.init()`, and the check runs once."""

    def __init__(self, config: ProcessorConfig):
        self.config = config
        self._args: dict[str, Any] | None = None

    def _resolved(self) -> dict[str, Any]:
        if self._args is None:
            self.config.check_cpu_budget()
            self._args = self.config.actor_args()
        return self._args

    def __getitem__(self, key: str) -> Any:
        return self._resolved()[key]

    def __iter__(self):
        return iter(self._resolved())

    def __len__(self) -> int:
        return len(self._resolved())

    def __repr__(self) -> str:
        return f"ReplicaArgs({self._args if self._args is not None else 'unresolved'})"


@dataclass
class Stage:
    """One step of a processor: `ds.map_batches(fn, **map_batches_kwargs, **ray_remote_args)`.
    `map_batches_kwargs` holds what shapes the call (`batch_size`, `batch_format`, `fn_kwargs`,
    `fn_constructor_kwargs`, `compute`, `udf_modifying_row_count`); `ray_remote_args` what
    each task or actor asks of the cluster (`num_cpus`, `num_gpus`, `memory`, `runtime_env`).
    Ray Data fuses consecutive stages that ask for the same resources into one operator."""

    name: str
    fn: Callable[..., Any]
    map_batches_kwargs: Mapping[str, Any] = field(default_factory=dict)
    ray_remote_args: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        return ds.map_batches(self.fn, **self.map_batches_kwargs, **self.ray_remote_args)


@dataclass
class SplitStage:
    """The input's blocks as blocks of `rows` rows, cut in the cluster as they stream (Ray
    Data's streaming repartition), so that decode runs in many small tasks whatever the
    input's blocks. `run()` leaves it out: it hands over blocks already cut, since on a small
    cluster the repartition of 10k-row listing blocks holds the CPUs decode needs."""

    rows: int
    name: str = "split"

    def __call__(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        return ds.repartition(target_num_rows_per_block=self.rows)


def model_stages(config: ProcessorConfig) -> list[Stage]:
    """prompt -> decode -> predict -> [finalize]: the stages every processor runs."""
    replica = ReplicaArgs(config)
    # Ray Data fuses a task stage into the actor stage after it when both ask for the same
    # resources. By default decode asks for other ones (a whole CPU, no memory reservation, no
    # runtime_env), so it runs in parallel tasks while the actors generate; with
    # decode_in_actors the stages before predict ask for the replica's very resources, which
    # is what lets Ray Data fuse them into the actor operator.
    before_predict = replica if config.decode_in_actors else {"num_cpus": 1}
    # One decode task per input block, decode_rows_per_task rows at a time, each batch
    # handed on as it is done.
    rows = {"batch_size": config.decode_rows_per_task, "batch_format": "pyarrow"}
    low, high = config.pool_size
    decode = config.decode_config()
    chips = decode.raster is not None and decode.raster.chipped  # many rows per scene
    stages = [
        Stage("prompt", add_task_columns,
              {**rows, "fn_kwargs": {"task": config.task, "prompt": config.prompt},
               "udf_modifying_row_count": False}, before_predict),
        Stage("decode", decode_stream if chips else decode_batch,
              {**rows, "fn_kwargs": {"config": decode},
               "udf_modifying_row_count": config.task.expand is not None or chips},
              before_predict),
        Stage("predict", Predictor,
              {"fn_constructor_kwargs": {"config": config.predict_config()},
               "batch_size": config.batch_size, "batch_format": "pyarrow",
               "compute": ray.data.ActorPoolStrategy(min_size=low, max_size=high),
               "udf_modifying_row_count": False}, replica),
    ]
    if config.task.finalize is not None:
        # No CPU asked, as for the write it feeds: a stage after the model that asks for a
        # CPU gets no budget while decode and the actors hold every CPU.
        stages.append(Stage("finalize", config.task.finalize,
                            {"batch_size": None, "batch_format": "pyarrow",
                             "udf_modifying_row_count": False}, {"num_cpus": 0}))
    return stages


class Processor:
    """Dataset -> Dataset: [preprocess] -> each stage in order -> [postprocess] (see the
    module's docstring). A stage is any callable from Dataset to Dataset with a `name`
    (`Stage`, `SplitStage`, `pipeline.run`'s resume filter and sink); `insert` adds one."""

    def __init__(self, config: ProcessorConfig, stages: list,
                 preprocess: Callable[[Row], Row] | None = None,
                 postprocess: Callable[[Row], Row] | None = None):
        self.config = config
        self.stages = list(stages)
        self.preprocess = preprocess
        self.postprocess = postprocess

    def __call__(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        if self.preprocess is not None:
            ds = ds.map(self.preprocess)
        for stage in self.stages:
            ds = stage(ds)
        if self.postprocess is not None:
            ds = ds.map(self.postprocess)
        return ds

    def names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def stage(self, name: str):
        """The first stage called `name`."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r}; the stages are {self.names()}")

    def insert(self, stage, after: str | None = None) -> Processor:
        """`stage` after the stage called `after`, else at the end (before postprocess)."""
        at = len(self.stages) if after is None else self.stages.index(self.stage(after)) + 1
        self.stages.insert(at, stage)
        return self

    def resolve(self) -> None:
        """Ask the cluster now for the resources the stages take from it (GPUs 'auto', the
        CPU budget check), so that a config it cannot run fails before any work; otherwise
        that happens when the processor is applied. Needs a connected Ray."""
        for stage in self.stages:
            dict(getattr(stage, "ray_remote_args", {}))


def build_processor(config: ProcessorConfig, preprocess: Callable[[Row], Row] | None = None,
                    postprocess: Callable[[Row], Row] | None = None) -> Processor:
    """A callable from Dataset to Dataset that answers every row (`ray.data.llm`'s
    `build_llm_processor`, for LLaVA-FlexAttn): split -> prompt -> decode -> predict ->
    [finalize]. `preprocess` and `postprocess` map one row (a dict) to another, before the
    stages and after them."""
    return Processor(config, [SplitStage(config.decode_rows_per_task), *model_stages(config)],
                     preprocess, postprocess)
