"""Stage 3, predict (GPU actors): one LLaVA-FlexAttn replica per actor, batched generation.

Use as `ds.map_batches(Predictor, fn_constructor_kwargs={"config": cfg}, batch_format="pyarrow",
compute=ActorPoolStrategy(...), num_gpus=..., batch_size=...)` (the processor's predict stage,
`pipeline.processor`).
The model is imported and loaded in `__init__`, once per actor, so the driver never imports
torch. Runs on CUDA when the actor sees a device, else on CPU (also when Ray assigned a GPU
that CUDA cannot see). Rows that arrive with an error, or marked `empty` (a chip of nodata
only), pass through untouched; a row whose generation fails gets `error_stage="predict"`
while the rest of its batch still gets answers. A batch that runs out of GPU memory is split
in halves and retried, recursively, down to one image; an image that does not fit alone
becomes an error row naming the out-of-memory error.
A row whose question is blank is an error row too (a null question means the job's prompt).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import gc
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from flexattn.conversation import as_prompt
from flexattn.options import DTYPES, MODES
from pipeline.columns import IMAGE, PREDICTION_FIELDS, format_error, require_columns

logger = logging.getLogger(__name__)

STAGE = "predict"
REQUIRED_COLUMNS = ("prompt", IMAGE, "width", "height", "error", "error_stage")
DEMO_MODEL = "demo"  # the tiny demo model, built on first use (flexattn.demo_model)
EMPTY_QUESTION_ERROR = "ValueError: empty question (the input row's question is blank)"
MODEL_CACHE = Path(os.environ.get("FLEXATTN_MODEL_CACHE", "~/.cache/llava-flexattn/models"))
# Layer s's 24x24 attention map over the image tokens at the last step (576 floats, row-major,
# before margin zeroing). Not in OUTPUT_SCHEMA: predict always adds it, and only tasks that
# list it in `extra_fields` write it (for overlays: `pipeline.overlays`, `flexattn.viz`).
SELECTION_MAP_FIELD = pa.field("selection_map", pa.list_(pa.float32()))
# Analytical cost of the row's generation in TFLOPs (flexattn.flops: vision, prefill, decode,
# high-res keys and values, from the row's own selection, tiles and projected blocks).
TFLOPS_FIELD = pa.field("tflops", pa.float64())
# Added by predict to every row, after the standard columns; tasks write those they list.
PREDICT_EXTRA_FIELDS = (SELECTION_MAP_FIELD, TFLOPS_FIELD)


# Test-only fault injection, inert unless set (tests/reliability/test_oom.py): with
# FLEXATTN_TEST_OOM_ABOVE=N every generate() call on more than N images raises
# torch.OutOfMemoryError before running, and with FLEXATTN_TEST_OOM_IDS=a,b any call holding
# one of those ids raises it, even alone. Read once per actor, which warns when it is on.
TEST_OOM_ABOVE_ENV = "FLEXATTN_TEST_OOM_ABOVE"
TEST_OOM_IDS_ENV = "FLEXATTN_TEST_OOM_IDS"


@dataclass(frozen=True)
class OomFaultHook:
    """TEST ONLY: simulated out-of-memory errors, to show the predict stage's recovery on CPU."""

    above: int | None = None
    ids: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls) -> OomFaultHook:
        above = os.environ.get(TEST_OOM_ABOVE_ENV, "").strip()
        ids = os.environ.get(TEST_OOM_IDS_ENV, "").strip()
        return cls(above=int(above) if above else None,
                   ids=frozenset(i for i in ids.split(",") if i))

    @property
    def active(self) -> bool:
        return self.above is not None or bool(self.ids)

    def check(self, ids: list[str], torch) -> None:
        too_many = self.above is not None and len(ids) > self.above
        if too_many or self.ids.intersection(ids):
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (simulated by the test fault hook {TEST_OOM_ABOVE_ENV}/"
                f"{TEST_OOM_IDS_ENV}) on a batch of {len(ids)}"
            )


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, or a RuntimeError that CUDA / cuBLAS / MPS raised for lack of
    memory (older builds and some kernels raise a plain RuntimeError)."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


@dataclass(frozen=True)
class PredictConfig:
    model: str = DEMO_MODEL  # checkpoint dir, an object-storage URI of one, or "demo"
    vision_tower: str | None = None  # directory or URI; default: from the checkpoint config
    mode: str = "flexattn"
    max_new_tokens: int = 64
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on CPU
    overrides: tuple[tuple[str, object], ...] = ()  # model config fields, e.g. threshold

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model must name a checkpoint directory, a URI or 'demo'")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")


def localize_model(model: str) -> str:
    """A local directory for `model`: "demo" is built on first use, a `scheme://` URI is
    copied once per node into MODEL_CACHE (under a file lock), a local path is used as is."""
    if model == DEMO_MODEL:
        from flexattn.demo_model import demo_model_path

        return str(demo_model_path())
    if "://" not in model:
        return model
    from pipeline.storage import open_fs

    cache = MODEL_CACHE.expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / hashlib.sha256(model.encode()).hexdigest()[:16]
    with open(cache / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            fs, path = open_fs(model)
            logger.info("copying model %s to %s", model, target)
            fs.get(path.rstrip("/") + "/", str(target), recursive=True)
            (target / ".complete").touch()
    return str(target)


# The same as keep_freed_memory(), for a process yet to start (Ray passes it to the CPU predict
# actors in their runtime_env: `pipeline.processor`). From the start, one arena serves every thread, which
# matters because Ray Data calls the model from a worker thread: per-thread arenas grow in
# 64 MB heaps that glibc unmaps whenever one empties, whatever the settings below.
KEEP_FREED_MEMORY_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**40),
}


def keep_freed_memory() -> bool:
    """Make glibc keep the memory that tensors free, for the next ones, instead of handing it
    back to the OS: large blocks come from the heap (M_MMAP_MAX 0), the heap is not trimmed
    (M_TRIM_THRESHOLD at its maximum) and threads started from now on share the main arena
    (M_ARENA_MAX 1). By default every freed buffer above the (adaptive, at most 32 MB) mmap
    threshold is unmapped, and the next one of its size is paid for again in page faults, at
    every layer of every step. For processes that only run the model: the process stays at its
    peak memory. False where the C library is not glibc (nothing changed)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's <malloc.h>
    return all(mallopt(option, value) for option, value in (
        (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_arena_max, 1)))


def tensor_column(table: pa.Table, name: str) -> np.ndarray:
    """A Ray tensor column as one ndarray (no copy when the column has one chunk)."""
    chunks = table.column(name).chunks
    if len(chunks) == 1:
        return chunks[0].to_numpy()
    return np.concatenate([chunk.to_numpy() for chunk in chunks])


class Predictor:
    """Ray Data callable class: holds one model replica."""

    def __init__(self, config: PredictConfig):
        import torch

        from flexattn import load_model

        self.config = config
        self._torch = torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1"):
            logger.warning(
                "Ray assigned GPU(s) %s but CUDA is not available here: running on CPU",
                os.environ["CUDA_VISIBLE_DEVICES"],
            )
        if device == "cpu" and keep_freed_memory():
            logger.info("predict: glibc keeps freed memory for reuse in this actor")
        dtype = getattr(torch, config.dtype) if config.dtype else None
        path = localize_model(config.model)
        tower = localize_model(config.vision_tower) if config.vision_tower else None
        start = time.perf_counter()
        self.model = load_model(
            path,
            vision_tower=tower,
            device=device,
            dtype=dtype,
            mode=config.mode,
            **dict(config.overrides),
        )
        self.model_id = getattr(self.model, "model_id", None) or Path(path).name
        self.device = device
        self._fault_hook = OomFaultHook.from_env()
        if self._fault_hook.active:
            logger.warning("predict: TEST-ONLY out-of-memory fault hook is on (%s)",
                           self._fault_hook)
        logger.info(
            "predict: loaded %s (%s, mode=%s) on %s in %.1fs",
            self.model_id, path, config.mode, device, time.perf_counter() - start,
        )

    def _generate(self, ids, images, prompts, sizes) -> list:
        """Generations in input order, an exception in place of each row that failed. Out of
        memory: split the batch in halves and retry each, recursively, down to one image
        (freeing CUDA's cache between tries); any other failure: retry the rows one by one.
        Either way one bad row costs one error row."""
        kwargs = {"max_new_tokens": self.config.max_new_tokens, "do_sample": False}
        try:
            self._fault_hook.check(ids, self._torch)  # test-only; inert by default
            with self._torch.inference_mode():
                return list(self.model.generate(images, prompts, image_sizes=sizes, **kwargs))
        except Exception as exc:  # noqa: BLE001 - isolate the failing rows below
            # Drop the traceback: its frames hold the failed batch's tensors.
            error, oom = exc.with_traceback(None), is_out_of_memory(exc)
        if oom:
            self._free_memory()
        if len(images) == 1:
            return [error]
        if oom:
            half = (len(images) + 1) // 2
            logger.warning("predict: out of memory on a batch of %d; retrying as %d + %d",
                           len(images), half, len(images) - half)
            return (self._generate(ids[:half], images[:half], prompts[:half], sizes[:half])
                    + self._generate(ids[half:], images[half:], prompts[half:], sizes[half:]))
        logger.warning("predict: batch of %d failed (%s); retrying rows one by one",
                       len(images), format_error(error))
        return [self._generate([d], [i], [p], [s])[0]
                for d, i, p, s in zip(ids, images, prompts, sizes)]

    def _free_memory(self) -> None:
        gc.collect()
        if self.device == "cuda":
            self._torch.cuda.empty_cache()

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(STAGE, batch, REQUIRED_COLUMNS)
        start = time.perf_counter()
        n = batch.num_rows
        errors = batch.column("error").to_pylist()
        stages = batch.column("error_stage").to_pylist()
        questions = batch.column("prompt").to_pylist()
        for i in range(n):
            if errors[i] is None and not (questions[i] or "").strip():
                errors[i], stages[i] = EMPTY_QUESTION_ERROR, STAGE
        # A chip of nodata only (`empty`, pipeline.raster) is no error and asks the model nothing.
        empty = (batch.column("empty").to_pylist() if "empty" in batch.column_names
                 else [False] * n)
        todo = [i for i in range(n) if errors[i] is None and not bool(empty[i])]
        fields = (*PREDICTION_FIELDS, *PREDICT_EXTRA_FIELDS)
        values: dict[str, list] = {f.name: [None] * n for f in fields}
        values["model"] = [self.model_id] * n
        if todo:
            from PIL import Image

            pixels = tensor_column(batch, IMAGE)  # uint8 [B, S, S, 3]
            widths = batch.column("width").to_pylist()
            heights = batch.column("height").to_pylist()
            ids = (batch.column("id").to_pylist() if "id" in batch.column_names
                   else [str(i) for i in range(n)])
            results = self._generate(
                [ids[i] for i in todo],
                [Image.fromarray(np.ascontiguousarray(pixels[i])) for i in todo],
                [as_prompt(questions[i]) for i in todo],
                [(widths[i], heights[i]) for i in todo],
            )
            for i, gen in zip(todo, results):
                if isinstance(gen, Exception):
                    errors[i], stages[i] = format_error(gen), STAGE
                    continue
                values["answer"][i] = gen.text
                values["prompt_tokens"][i] = gen.prompt_tokens
                values["generated_tokens"][i] = len(gen.token_ids)
                values["hr_selected_per_layer"][i] = [int(v) for v in gen.hr_selected_per_layer]
                values["hr_selected_frac"][i] = float(gen.hr_selected_frac)
                values["hr_cells"][i] = [bool(v) for v in gen.hr_cells]
                values["prefill_ms"][i] = float(gen.prefill_ms)
                values["decode_ms"][i] = float(gen.decode_ms)
                values["selection_map"][i] = gen.selection_map
                values["tflops"][i] = gen.tflops
        out = batch.drop_columns([IMAGE, "error", "error_stage"])
        for field in fields:
            if field.name in out.column_names:
                out = out.drop_columns([field.name])
            out = out.append_column(field, pa.array(values[field.name], field.type))
        out = out.append_column("error", pa.array(errors, pa.string()))
        out = out.append_column("error_stage", pa.array(stages, pa.string()))
        logger.info(
            "predict: %d rows (%d generated, %d errors) on %s in %.2fs",
            n, len(todo), sum(e is not None for e in errors), self.device,
            time.perf_counter() - start,
        )
        return out
