"""Predict stage with the real tiny demo model, called directly (no cluster)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.columns import OUTPUT_SCHEMA, MissingColumnsError
from pipeline.decode import DecodeConfig, decode_batch
from pipeline.predict import KEEP_FREED_MEMORY_ENV, PredictConfig, Predictor, localize_model
from tests.helpers import noise_image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def predictor(demo_model):
    return Predictor(PredictConfig(model=str(demo_model), max_new_tokens=3))


def _decoded(tmp_path, prompts=None):
    paths = [tmp_path / "wide.png", tmp_path / "corrupt.jpg", tmp_path / "tall.jpg"]
    noise_image(1500, 700, seed=1).save(paths[0])
    paths[1].write_bytes(b"not an image")
    noise_image(600, 1400, seed=2).save(paths[2])
    table = pa.table({
        "id": [p.name for p in paths],
        "source_uri": [str(p) for p in paths],
        "prompt": prompts or ["Describe this image."] * 3,
    })
    return decode_batch(table, DecodeConfig(image_size=1008))


def test_predict_answers_good_rows_and_passes_errors_through(predictor, tmp_path):
    out = predictor(_decoded(tmp_path))
    assert "image" not in out.column_names
    assert {f.name for f in OUTPUT_SCHEMA} - {"task"} <= set(out.column_names)
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == ["wide.png", "corrupt.jpg", "tall.jpg"]
    assert [r["error_stage"] for r in rows] == [None, "decode", None]
    assert all(r["model"] == "llava-v1.5-tiny-flexattn" for r in rows)
    assert rows[1]["answer"] is None and rows[1]["hr_cells"] is None
    for r in (rows[0], rows[2]):
        assert isinstance(r["answer"], str)
        assert 1 <= r["generated_tokens"] <= 3
        assert r["prompt_tokens"] > 576  # the image tokens are part of the prompt
        assert len(r["hr_cells"]) == 81 and any(r["hr_cells"])
        assert len(r["hr_selected_per_layer"]) >= 1
        assert 0.0 < r["hr_selected_frac"] <= 1.0
        assert r["prefill_ms"] > 0 and r["decode_ms"] >= 0
    # Padding margins are never selected: the wide image's top and bottom cell rows stay off.
    assert not any(rows[0]["hr_cells"][:9]) and not any(rows[0]["hr_cells"][-9:])


def test_a_failing_row_does_not_fail_its_batch(predictor, tmp_path):
    prompts = ["Describe.", "Describe.", "two images? <image> <image>"]
    out = predictor(_decoded(tmp_path, prompts)).to_pylist()
    assert [r["error_stage"] for r in out] == [None, "decode", "predict"]
    assert out[0]["answer"] is not None and out[2]["answer"] is None
    assert out[2]["error"]


def test_missing_columns_name_the_stage(predictor):
    with pytest.raises(MissingColumnsError, match="stage 'predict'"):
        predictor(pa.table({"id": ["a"]}))


def test_cpu_fallback_when_ray_assigned_a_gpu_cuda_cannot_see(demo_model, monkeypatch, caplog):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with caplog.at_level(logging.WARNING, logger="pipeline.predict"):
        p = Predictor(PredictConfig(model=str(demo_model), max_new_tokens=1))
    assert p.device == "cpu"
    assert "CUDA is not available" in caplog.text


def test_model_and_tower_from_object_storage(demo_model, s3, tmp_path, monkeypatch):
    root = demo_model.parent  # tiny-demo/{llava-v1.5-tiny-flexattn, clip-vit-tiny-patch14-336}
    for path in root.rglob("*"):
        if path.is_file():
            key = f"models/{path.relative_to(root)}"
            s3.put_object(Bucket=s3.bucket, Key=key, Body=path.read_bytes())
    cache = tmp_path / "cache"
    monkeypatch.setattr("pipeline.predict.MODEL_CACHE", cache)
    model_uri = f"s3://{s3.bucket}/models/{demo_model.name}"
    tower_uri = f"s3://{s3.bucket}/models/clip-vit-tiny-patch14-336"
    p = Predictor(PredictConfig(model=model_uri, vision_tower=tower_uri, max_new_tokens=1))
    local = localize_model(model_uri)
    assert {f.name for f in demo_model.iterdir()} <= {f.name for f in (cache / local).iterdir()}
    stamp = (cache / local / ".complete").stat().st_mtime_ns
    assert localize_model(model_uri) == local  # second call: no copy
    assert (cache / local / ".complete").stat().st_mtime_ns == stamp
    out = p(_decoded(tmp_path)).to_pylist()
    assert [r["error_stage"] for r in out] == [None, "decode", None]
    assert out[0]["generated_tokens"] == 1


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--mode"):
        PredictConfig(mode="turbo")
    with pytest.raises(ValueError, match="--max-new-tokens"):
        PredictConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="--dtype"):
        PredictConfig(dtype="int8")


FAULTS_CHILD = """
import resource, sys, threading
import numpy as np
from pipeline.predict import keep_freed_memory
mode = sys.argv[1]
if mode == "mallopt":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rounds():
    for _ in range(2):  # let the heap grow to the buffer's size first
        a = np.ones(64 * 2**20, np.uint8); del a
    before = faults()
    for _ in range(5):  # what a layer does at every step: a large buffer, freed, then again
        a = np.ones(64 * 2**20, np.uint8); del a
    print(faults() - before)
if mode.endswith("thread"):  # where Ray Data calls the model
    worker = threading.Thread(target=rounds); worker.start(); worker.join()
else:
    rounds()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc rusage")
def test_keep_freed_memory_stops_page_faults_on_reused_buffers():
    """A fresh process allocates, touches and frees a 64 MB buffer five times: with glibc's
    defaults every round is mapped and faulted in again. After keep_freed_memory() the heap
    serves it and nothing is faulted in, and so in a worker thread of a process started with
    KEEP_FREED_MEMORY_ENV (what the CPU predict actors get)."""
    def page_faults(mode: str, env: dict | None = None) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_CHILD, mode], capture_output=True,
                             text=True, check=True, cwd=ROOT, env=os.environ | (env or {}))
        return int(out.stdout.strip())

    default = page_faults("default")
    assert default > 100  # 16384 pages a round here, fewer with transparent huge pages
    assert page_faults("mallopt") * 10 < default
    in_thread = page_faults("thread")
    assert in_thread > 100
    assert page_faults("env-thread", KEEP_FREED_MEMORY_ENV) * 10 < in_thread
