"""Issue 5.5: out of GPU memory in a batch -> the batch is split in halves and retried down to
one image; an image that does not fit alone becomes an error row. Shown on CPU with the real
tiny model through the predict stage's test-only fault hook (FLEXATTN_TEST_OOM_*)."""

from __future__ import annotations

import logging

import pyarrow as pa
import pytest
import torch

from pipeline.decode import DecodeConfig, decode_batch
from pipeline.predict import (
    TEST_OOM_ABOVE_ENV,
    TEST_OOM_IDS_ENV,
    OomFaultHook,
    PredictConfig,
    Predictor,
    is_out_of_memory,
)
from tests.helpers import noise_image

IDS = ["a.png", "b.png", "c.png", "d.png"]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("oom")
    for i, name in enumerate(IDS):
        noise_image(300 + 40 * i, 260, seed=i).save(root / name)
    table = pa.table({"id": IDS, "source_uri": [str(root / n) for n in IDS],
                      "prompt": ["Describe this image."] * len(IDS)})
    return decode_batch(table, DecodeConfig(image_size=1008))


@pytest.fixture(scope="module")
def predictor(demo_model):
    return Predictor(PredictConfig(model=str(demo_model), max_new_tokens=1))


@pytest.fixture()
def recorded(predictor, monkeypatch):
    """`set_hook(hook)` installs a fault hook; `attempts` gets the size of every generate()
    attempt (the hook sees each one), `generated` of every call that reached the model."""
    attempts, generated = [], []
    generate = predictor.model.generate

    def set_hook(hook: OomFaultHook) -> None:
        class Recording:
            def check(self, ids, torch):
                attempts.append(len(ids))
                hook.check(ids, torch)

        monkeypatch.setattr(predictor, "_fault_hook", Recording())

    def recording_generate(images, *args, **kwargs):
        generated.append(len(images))
        return generate(images, *args, **kwargs)

    monkeypatch.setattr(predictor.model, "generate", recording_generate)
    return set_hook, attempts, generated


def test_fault_hook_reads_the_environment_and_is_inert_by_default(monkeypatch):
    monkeypatch.delenv(TEST_OOM_ABOVE_ENV, raising=False)
    monkeypatch.delenv(TEST_OOM_IDS_ENV, raising=False)
    assert OomFaultHook.from_env() == OomFaultHook() and not OomFaultHook().active
    OomFaultHook().check(["x"] * 1000, torch)  # never raises when off
    monkeypatch.setenv(TEST_OOM_ABOVE_ENV, "2")
    monkeypatch.setenv(TEST_OOM_IDS_ENV, "x.png,y.png")
    hook = OomFaultHook.from_env()
    assert hook == OomFaultHook(above=2, ids=frozenset({"x.png", "y.png"})) and hook.active
    hook.check(["a", "b"], torch)
    with pytest.raises(torch.OutOfMemoryError):
        hook.check(["a", "b", "c"], torch)
    with pytest.raises(torch.OutOfMemoryError):
        hook.check(["y.png"], torch)


def test_no_fault_one_call_for_the_batch(predictor, recorded, batch):
    set_hook, attempts, generated = recorded
    set_hook(OomFaultHook())
    out = predictor(batch).to_pylist()
    assert [r["id"] for r in out] == IDS and all(r["error"] is None for r in out)
    assert attempts == [4] and generated == [4]


def test_oom_batch_is_split_in_halves_down_to_one_image(predictor, recorded, batch, caplog):
    set_hook, attempts, generated = recorded
    set_hook(OomFaultHook(above=1))
    with caplog.at_level(logging.WARNING, logger="pipeline.predict"):
        out = predictor(batch).to_pylist()
    assert [r["id"] for r in out] == IDS
    assert [r["error"] for r in out] == [None] * 4
    assert all(r["answer"] is not None and r["generated_tokens"] == 1 for r in out)
    # 4 -> 2 + 2 -> 1 + 1 + 1 + 1: the model ran on one image at a time.
    assert attempts == [4, 2, 1, 1, 2, 1, 1] and generated == [1, 1, 1, 1]
    assert caplog.text.count("out of memory on a batch of 4; retrying as 2 + 2") == 1
    assert caplog.text.count("out of memory on a batch of 2; retrying as 1 + 1") == 2


def test_an_image_that_does_not_fit_alone_becomes_an_error_row(predictor, recorded, batch):
    set_hook, attempts, generated = recorded
    set_hook(OomFaultHook(ids=frozenset({"c.png"})))
    out = predictor(batch).to_pylist()
    assert [r["id"] for r in out] == IDS
    assert [r["error_stage"] for r in out] == [None, None, "predict", None]
    assert out[2]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert out[2]["answer"] is None and out[2]["model"] == "llava-v1.5-tiny-flexattn"
    for r in (out[0], out[1], out[3]):
        assert r["answer"] is not None and len(r["hr_cells"]) == 81
    # 4 -> [a b] runs + [c d] -> [c] alone fails (error row) + [d] runs.
    assert attempts == [4, 2, 2, 1, 1] and generated == [2, 1]


def test_cuda_oom_raised_as_a_plain_runtime_error_is_split_too(predictor, recorded, batch,
                                                                monkeypatch):
    set_hook, attempts, generated = recorded
    set_hook(OomFaultHook())
    real = predictor.model.generate

    def fails_above_two(images, *args, **kwargs):
        if len(images) > 2:  # how older CUDA builds and cuBLAS report it
            raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ...")
        return real(images, *args, **kwargs)

    monkeypatch.setattr(predictor.model, "generate", fails_above_two)
    out = predictor(batch).to_pylist()
    assert [r["id"] for r in out] == IDS and all(r["error"] is None for r in out)
    assert attempts == [4, 2, 2] and generated == [2, 2]


def test_is_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not raised by torch
