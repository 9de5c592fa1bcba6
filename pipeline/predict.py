"""Stage 3, predict (GPU actors): one LLaVA-FlexAttn replica per actor, batched generation.

Use as `ds.map_batches(Predictor, fn_constructor_kwargs={"config": cfg}, batch_format="pyarrow",
compute=ActorPoolStrategy(...), num_gpus=..., batch_size=...)` (see `pipeline.run`).
The model is imported and loaded in `__init__`, once per actor, so the driver never imports
torch. Runs on CUDA when the actor sees a device, else on CPU (also when Ray assigned a GPU
that CUDA cannot see). Rows that arrive with an error pass through untouched; a row whose
generation fails gets `error_stage="predict"` while the rest of its batch still gets answers.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.columns import IMAGE, PREDICTION_FIELDS, format_error, require_columns

logger = logging.getLogger(__name__)

STAGE = "predict"
REQUIRED_COLUMNS = ("id", "prompt", IMAGE, "width", "height", "error", "error_stage")
DEMO_MODEL = "demo"  # the tiny demo model, built on first use (flexattn.testing)
MODES = ("flexattn", "lowres", "fullres")
DTYPES = ("bfloat16", "float16", "float32")
MODEL_CACHE = Path(os.environ.get("FLEXATTN_MODEL_CACHE", "~/.cache/llava-flexattn/models"))


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
        from flexattn.testing import demo_model_path

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
        from flexattn.conversation import llava_v1_prompt

        self.config = config
        self._prompt = llava_v1_prompt
        self._torch = torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1"):
            logger.warning(
                "Ray assigned GPU(s) %s but CUDA is not available here: running on CPU",
                os.environ["CUDA_VISIBLE_DEVICES"],
            )
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
        logger.info(
            "predict: loaded %s (%s, mode=%s) on %s in %.1fs",
            self.model_id, path, config.mode, device, time.perf_counter() - start,
        )

    def _full_prompt(self, question: str) -> str:
        return question if "<image>" in question else self._prompt(question)

    def _generate(self, images, prompts, sizes) -> list:
        """Generations in input order; where a batch fails, retry its rows one by one so
        one bad row costs one error, and record each failure as the exception."""
        kwargs = {"max_new_tokens": self.config.max_new_tokens, "do_sample": False}
        try:
            with self._torch.inference_mode():
                return list(self.model.generate(images, prompts, image_sizes=sizes, **kwargs))
        except Exception as exc:  # noqa: BLE001 - isolate the failing rows below
            if len(images) == 1:
                return [exc]
            logger.warning("predict: batch of %d failed (%s); retrying rows one by one",
                           len(images), format_error(exc))
        return [self._generate([i], [p], [s])[0] for i, p, s in zip(images, prompts, sizes)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(STAGE, batch, REQUIRED_COLUMNS)
        start = time.perf_counter()
        n = batch.num_rows
        errors = batch.column("error").to_pylist()
        stages = batch.column("error_stage").to_pylist()
        todo = [i for i in range(n) if errors[i] is None]
        values: dict[str, list] = {f.name: [None] * n for f in PREDICTION_FIELDS}
        values["model"] = [self.model_id] * n
        if todo:
            from PIL import Image

            pixels = tensor_column(batch, IMAGE)  # uint8 [B, S, S, 3]
            questions = batch.column("prompt").to_pylist()
            widths = batch.column("width").to_pylist()
            heights = batch.column("height").to_pylist()
            results = self._generate(
                [Image.fromarray(np.ascontiguousarray(pixels[i])) for i in todo],
                [self._full_prompt(questions[i]) for i in todo],
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
        out = batch.drop_columns([IMAGE, "error", "error_stage"])
        for field in PREDICTION_FIELDS:
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
