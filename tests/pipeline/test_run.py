"""The assembled pipeline on a real local Ray with the real tiny model: error rows, resume,
overwrite; plus the job config and its validation."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.columns import conform, output_schema
from pipeline.resume import list_output_files
from pipeline.run import JobConfig, add_task_columns, build_dataset, parse_actors, run
from pipeline.tasks import CAPTION
from pipeline.write import part_name, write_table
from tests.helpers import noise_image


def _folder(root, n_good=4):
    root.mkdir()
    for i in range(n_good):
        noise_image(500 + 40 * i, 380, seed=i).save(root / f"img{i}.jpg")
    (root / "img9_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def _config(tmp_path, **kw):
    base = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
            "model": kw.pop("model"), "max_new_tokens": 2, "batch_size": 2,
            "decode_rows_per_task": 2, "memory_per_actor_gb": 0.5}
    return JobConfig(**(base | kw))


def test_run_resume_and_overwrite(ray_local, demo_model, tmp_path):
    _folder(tmp_path / "in")
    out = tmp_path / "out"

    first = run(_config(tmp_path, model=str(demo_model), limit=3))
    assert (first.rows_listed, first.rows_written, first.rows_skipped) == (3, 3, 0)
    assert first.model == "llava-v1.5-tiny-flexattn"
    ids_first = set(pq.read_table(out).column("id").to_pylist())
    files_first = set(list_output_files(str(out)))

    second = run(_config(tmp_path, model=str(demo_model)))
    assert (second.rows_listed, second.rows_skipped, second.rows_written) == (5, 3, 2)
    assert set(list_output_files(str(out))) > files_first  # earlier files untouched
    table = pq.read_table(out)
    assert table.schema == output_schema(CAPTION.extra_fields)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == ["img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg", "img9_corrupt.png"]
    assert len(ids) == len(set(ids))  # each input exactly once
    assert ids_first < set(ids)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["img9_corrupt.png"]["error_stage"] == "decode"
    assert second.errors_by_stage == {"decode": 1}
    for name in ("img0.jpg", "img3.jpg"):
        assert rows[name]["error"] is None and rows[name]["answer"] is not None
        assert rows[name]["width"] in (500, 620) and rows[name]["height"] == 380
        assert rows[name]["task"] == "caption"
        assert rows[name]["prompt"] == CAPTION.default_prompt

    third = run(_config(tmp_path, model=str(demo_model)))
    assert (third.rows_written, third.rows_skipped) == (0, 5)
    assert pq.read_table(out).num_rows == 5

    fresh = run(_config(tmp_path, model=str(demo_model), overwrite=True, limit=2))
    assert (fresh.rows_written, fresh.rows_skipped) == (2, 0)
    assert sorted(pq.read_table(out).column("id").to_pylist()) == ["img0.jpg", "img1.jpg"]


def test_resume_drops_written_inputs_block_by_block(ray_local, demo_model, tmp_path,
                                                    monkeypatch):
    monkeypatch.setattr("pipeline.inputs.LISTING_BLOCK_ROWS", 7)  # 30 inputs -> 5 blocks
    (tmp_path / "img").mkdir()
    for i in range(2):
        noise_image(300, 200 + 100 * i, seed=i).save(tmp_path / "img" / f"{i}.png")
    ids = [f"r{i:02d}" for i in range(30)]
    pq.write_table(pa.table({"id": ids, "image_uri": [f"img/{i % 2}.png" for i in range(30)]}),
                   tmp_path / "manifest.parquet")
    out = tmp_path / "out"
    before = ids[:14] + ["r20"]  # blocks 0 and 1 whole, one row of block 2
    schema = output_schema(CAPTION.extra_fields)
    earlier = conform(pa.table({"id": before, "source_uri": before,
                                "task": ["caption"] * 15}), schema)
    write_table(earlier, str(out), part_name(earlier, ("id",)))
    summary = run(_config(tmp_path, model=str(demo_model), input=str(tmp_path / "manifest.parquet"),
                          batch_size=4, max_new_tokens=1, rows_per_file=4))
    assert (summary.rows_listed, summary.rows_skipped, summary.rows_written) == (30, 15, 15)
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == ids  # each input exactly once
    new_files = [pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet")
                 if p.name != part_name(earlier, ("id",))]
    assert sum(new_files) == 15 and len(new_files) <= 4  # >= 4 rows a file, the last fewer
    assert sorted(new_files)[1:] == [n for n in sorted(new_files)[1:] if n >= 4]


def _optimized_plan(ds, capsys) -> str:
    capsys.readouterr()
    ds.explain()  # prints the logical and physical plans, the optimized physical plan last
    return capsys.readouterr().out.split("Physical Plan (Optimized)")[1]


def test_decode_in_actors_fuses_decode_into_the_actors(ray_local, tmp_path, capsys):
    todo = add_task_columns(pa.table({"id": ["a.jpg"], "source_uri": ["/x/a.jpg"]}), CAPTION,
                            None)
    done = pa.table({"id": ["b.jpg"], "page": pa.array([0], pa.int32())})
    split = "TaskPoolMapOperator[StreamingRepartition[num_rows_per_block=2,strict=False]]"
    prepare = "MapBatches(add_task_columns)->MapBatches(decode_batch)"
    separate = _optimized_plan(build_dataset(_config(tmp_path, model="demo"), todo), capsys)
    assert f"TaskPoolMapOperator[{prepare}]" in separate
    assert "ActorPoolMapOperator[MapBatches(Predictor)]" in separate
    # Large input blocks are split into decode-sized ones by an operator of their own, so
    # decode runs in one task per small block, not inside the split's task.
    assert split in separate
    fused = _optimized_plan(build_dataset(_config(tmp_path, model="demo", decode_in_actors=True),
                                          todo), capsys)
    assert f"ActorPoolMapOperator[{prepare}->MapBatches(Predictor)]" in fused
    assert "TaskPoolMapOperator[MapBatches(add_task_columns)" not in fused and split in fused
    # A resume filter between decode and predict (tasks keyed after decode) joins them too.
    fused = _optimized_plan(build_dataset(_config(tmp_path, model="demo", decode_in_actors=True),
                                          todo, done), capsys)
    assert (f"ActorPoolMapOperator[{prepare}->MapBatches(drop_written)"
            "->MapBatches(Predictor)]") in fused


def test_decode_in_actors_writes_the_same_rows(ray_local, demo_model, tmp_path):
    _folder(tmp_path / "in")
    tables = {}
    for fused in (False, True):
        out = tmp_path / f"out-{fused}"
        summary = run(_config(tmp_path, model=str(demo_model), output=str(out),
                              decode_in_actors=fused))
        assert (summary.rows_written, summary.rows_ok, summary.errors_by_stage) == (
            5, 4, {"decode": 1})
        tables[fused] = pq.read_table(out).sort_by("id")
    columns = ["id", "answer", "width", "height", "hr_selected_per_layer", "error",
               "error_stage"]
    assert tables[True].select(columns).to_pylist() == tables[False].select(columns).to_pylist()
    assert tables[True].column("answer").null_count == 1  # the corrupt PNG's error row


def test_parse_actors():
    assert parse_actors("2") == (2, 2)
    assert parse_actors("1,8") == (1, 8)
    for bad in ("0", "3,1", "a", "1,2,3", ""):
        with pytest.raises(ValueError, match="--actors"):
            parse_actors(bad)


@pytest.mark.parametrize("field,value,flag", [
    ("batch_size", 0, "--batch-size"),
    ("actors", "4,2", "--actors"),
    ("gpus_per_actor", -1, "--gpus-per-actor"),
    ("limit", 0, "--limit"),
    ("mode", "turbo", "--mode"),
    ("max_new_tokens", 0, "--max-new-tokens"),
    ("max_pixels", 0, "--max-pixels"),
    ("prompt", " ", "--prompt"),
    ("output", "", "--output"),
    ("input", "", "--input"),
])
def test_job_config_errors_name_the_flag(field, value, flag):
    kwargs = {"input": "in", "output": "out", field: value}
    with pytest.raises(ValueError, match=flag):
        JobConfig(**kwargs)


def test_prompt_is_the_rows_question_else_the_jobs():
    inputs = pa.table({"id": ["a", "b"], "source_uri": ["x", "y"],
                       "question": pa.array(["Is it a port?", None], pa.string())})
    out = add_task_columns(inputs, CAPTION, None)
    assert out.column("prompt").to_pylist() == ["Is it a port?", CAPTION.default_prompt]
    assert out.column("task").to_pylist() == ["caption", "caption"]
    out = add_task_columns(inputs, CAPTION, "Count the ships.")
    assert out.column("prompt").to_pylist() == ["Is it a port?", "Count the ships."]


def test_cpu_actors_holding_every_cpu_are_refused(ray_local, tmp_path):
    # local Ray with 2 CPUs: two 1-CPU actors would leave nothing for decode tasks (a hang)
    config = JobConfig(input=str(tmp_path), output=str(tmp_path / "out"), actors=(1, 2),
                       gpus_per_actor=0)
    with pytest.raises(ValueError, match="--actors 2 x --cpus-per-actor 1 would hold 2 of"):
        run(config)
    JobConfig(input=str(tmp_path), output=str(tmp_path / "out"), actors=(1, 1),
              gpus_per_actor=0).check_cpu_budget()  # one actor leaves a CPU for decoding
