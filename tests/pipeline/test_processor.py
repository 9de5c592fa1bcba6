"""`build_processor` on user-built Datasets (a real local Ray, the real tiny model): the same
answers as `run()` on the same images whether the image comes as bytes, a URI or an array;
preprocess and postprocess hooks; error rows; config validation naming the field."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import CAPTION, ProcessorConfig, build_processor
from pipeline.processor import Stage
from pipeline.run import JobConfig, run
from tests.helpers import noise_image

NAMES = ["a.jpg", "b.png", "c.jpg"]
COMPARED = ["answer", "width", "height", "prompt_tokens", "generated_tokens",
            "hr_selected_per_layer", "hr_cells"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue") / "imgs"
    root.mkdir()
    for i, name in enumerate(NAMES):
        noise_image(420 + 60 * i, 360, seed=10 + i).save(root / name)
    (root / "d_corrupt.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    return root


# One image per generate() call everywhere: rows batched differently would still match, but
# only to float tolerance; alone, each row's computation is the same in every run.
def _config(model, **kw) -> ProcessorConfig:
    return ProcessorConfig(**({"model": str(model), "max_new_tokens": 3, "batch_size": 1,
                               "memory_per_replica_gb": 0.5, "decode_rows_per_task": 2} | kw))


@pytest.fixture(scope="module")
def by_run(images, demo_model, tmp_path_factory, pipeline_env):
    """The reference: `run()` over the folder, rows by id."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=512 * 1024**2)
    out = tmp_path_factory.mktemp("run") / "out"
    run(JobConfig(input=str(images), output=str(out), model=str(demo_model), max_new_tokens=3,
                  batch_size=1, decode_rows_per_task=2, memory_per_actor_gb=0.5))
    return {r["id"]: r for r in pq.read_table(out).to_pylist()}


def _same_answers(rows: list[dict], reference: dict, key=lambda r: r["id"]) -> None:
    for row in rows:
        expected = reference[key(row)]
        assert expected["error"] is None and row["error"] is None, (row["error"], key(row))
        assert {c: row[c] for c in COMPARED} == {c: expected[c] for c in COMPARED}, key(row)


def test_bytes_from_items_with_hooks_match_run(ray_local, images, demo_model, by_run):
    import ray

    items = [{"name": n, "image": (images / n).read_bytes()} for n in [*NAMES, "d_corrupt.jpg"]]
    processor = build_processor(
        _config(demo_model),
        preprocess=lambda row: {**row, "id": f"cat/{row['name']}"},
        postprocess=lambda row: {"id": row["id"], "answer": row["answer"],
                                 "error_stage": row["error_stage"], "prompt": row["prompt"],
                                 "words": len((row["answer"] or "").split()),
                                 **{c: row[c] for c in COMPARED if c != "answer"},
                                 "error": row["error"]},
    )
    rows = processor(ray.data.from_items(items)).take_all()
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == [f"cat/{n}" for n in [*NAMES, "d_corrupt.jpg"]]  # preprocess ran
    assert set(rows[0]) == {"id", "answer", "error_stage", "prompt", "words", "error",
                            *COMPARED}  # postprocess shaped every row
    assert by_id["cat/d_corrupt.jpg"]["error_stage"] == "decode"
    assert by_id["cat/d_corrupt.jpg"]["answer"] is None
    good = [r for r in rows if r["id"] != "cat/d_corrupt.jpg"]
    assert all(r["words"] == len(r["answer"].split()) for r in good)
    assert all(r["prompt"] == CAPTION.default_prompt for r in good)
    _same_answers(good, by_run, key=lambda r: r["id"].removeprefix("cat/"))


def test_uris_from_read_parquet_filtered_match_run(ray_local, images, demo_model, by_run,
                                                   tmp_path):
    import ray

    catalogue = tmp_path / "catalogue.parquet"
    pq.write_table(pa.table({
        "id": NAMES, "image": [str(images / n) for n in NAMES],
        "cloud_cover": [0.1, 0.9, 0.2],
        "prompt": pa.array([None, None, "Is there a road?"], pa.string()),
    }), catalogue)
    ds = ray.data.read_parquet(str(catalogue)).filter(lambda row: row["cloud_cover"] < 0.5)
    rows = build_processor(_config(demo_model))(ds).take_all()
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == ["a.jpg", "c.jpg"]  # the user's filter held
    assert by_id["a.jpg"]["cloud_cover"] == 0.1  # the user's columns ride along
    assert "image" not in by_id["a.jpg"]  # the image is not carried into the output
    assert by_id["a.jpg"]["prompt"] == CAPTION.default_prompt
    assert by_id["c.jpg"]["prompt"] == "Is there a road?"  # the row's own prompt
    _same_answers([by_id["a.jpg"]], by_run)
    assert by_id["c.jpg"]["error"] is None and by_id["c.jpg"]["answer"] is not None


def test_decoded_arrays_match_run(ray_local, images, demo_model, by_run):
    import ray

    items = [{"id": n, "image": np.asarray(Image.open(images / n).convert("RGB"))}
             for n in NAMES]
    items.append({"id": "flat.jpg", "image": np.zeros((4, 5, 2), np.uint8)})  # not an image
    rows = build_processor(_config(demo_model))(ray.data.from_items(items)).take_all()
    by_id = {r["id"]: r for r in rows}
    assert by_id["flat.jpg"]["error_stage"] == "decode"
    assert "got shape (4, 5, 2)" in by_id["flat.jpg"]["error"]
    _same_answers([by_id[n] for n in NAMES], by_run)


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, r"batch_size \(--batch-size\) must be >= 1"),
    ("concurrency", (3, 1), r"concurrency \(--actors\) must be n or \(min, max\)"),
    ("concurrency", "2", r"concurrency \(--actors\)"),
    ("gpus_per_replica", -1, r"gpus_per_replica \(--gpus-per-actor\)"),
    ("cpus_per_replica", 0, r"cpus_per_replica \(--cpus-per-actor\)"),
    ("decode_rows_per_task", 0, r"decode_rows_per_task"),
    ("mode", "turbo", "--mode"),
    ("max_new_tokens", 0, "--max-new-tokens"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ProcessorConfig(**{field: value})
    assert ProcessorConfig(concurrency=(1, 4)).pool_size == (1, 4)
    assert ProcessorConfig(concurrency=3).pool_size == (3, 3)


def _drop_b(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.invert(pc.ends_with(batch.column("id"), "b.png")))


def test_a_stage_added_to_the_list_runs_in_its_place(ray_local, images, demo_model, by_run):
    """A user's stage (here one that drops rows) goes into the list by name; the processor's
    call applies it like its own stages."""
    import ray

    processor = build_processor(_config(demo_model))
    assert processor.names() == ["split", "prompt", "decode", "predict"]
    decode = processor.stage("decode")
    processor.insert(Stage("drop_b", _drop_b, {"batch_size": None, "batch_format": "pyarrow"},
                           decode.ray_remote_args), after="decode")
    assert processor.names() == ["split", "prompt", "decode", "drop_b", "predict"]
    items = [{"id": n, "image": (images / n).read_bytes()} for n in NAMES]
    rows = processor(ray.data.from_items(items)).take_all()
    assert sorted(r["id"] for r in rows) == ["a.jpg", "c.jpg"]
    _same_answers(rows, by_run)


def test_stage_arguments_follow_the_config(ray_local):
    separate = build_processor(ProcessorConfig(batch_size=3, decode_rows_per_task=5,
                                               memory_per_replica_gb=0.5, gpus_per_replica=0))
    predict = separate.stage("predict")
    assert predict.map_batches_kwargs["batch_size"] == 3
    assert dict(predict.ray_remote_args)["num_gpus"] == 0
    assert dict(separate.stage("decode").ray_remote_args) == {"num_cpus": 1}
    assert separate.stage("decode").map_batches_kwargs["batch_size"] == 5
    fused = build_processor(ProcessorConfig(decode_in_actors=True, gpus_per_replica=0))
    # decode asks for the replica's own resources: Ray Data fuses it into the actors
    assert fused.stage("decode").ray_remote_args is fused.stage("predict").ray_remote_args
    with pytest.raises(KeyError, match="no stage 'resume'"):
        fused.stage("resume")
