"""The caption job on remote-sensing scenes, end to end on a real local Ray: a STAC
ItemCollection on moto's S3 naming two COGs, chipped, written as GeoParquet, and resumed per
chip after the job is killed half-way through a scene."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from jobs.caption_remote_sensing import main, parse_config
from tests.pipeline.rasters import rgb_uint8_scene, uint16_nodata_scene
from tests.reliability.jobproc import job_command, job_env, kill_job, start_job


@pytest.mark.parametrize("argv, flag", [
    (["--chip-size", "0"], "--chip-size"),
    (["--chip-size", "256", "--chip-overlap", "256"], "--chip-overlap"),
    (["--chip-overlap", "16"], "--chip-overlap"),
    (["--chip-size", "256", "--gsd", "-1"], "--gsd"),
    (["--gsd", "0.5"], "--gsd"),
    (["--bands", "4,3"], "--bands"),
    (["--bands", "0,1,2"], "--bands"),
    (["--bands", "red"], "--bands"),
    (["--stretch", "98,2"], "--stretch"),
    (["--stretch", "2"], "--stretch"),
    (["--asset", " "], "--asset"),
    (["--save-scene-maps", "-1"], "--save-scene-maps"),
])
def test_bad_raster_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2 and flag in capsys.readouterr().err


def test_raster_flags_reach_the_decode_config_and_key_chips():
    config, _ = parse_config(["--chip-size", "1008", "--chip-overlap", "64", "--gsd", "0.3",
                              "--bands", "4,3,2", "--stretch", "1,99"])
    raster = config.decode_config().raster
    assert (raster.chip_size, raster.chip_overlap, raster.gsd) == (1008, 64, 0.3)
    assert raster.bands == (4, 3, 2) and raster.stretch == (1.0, 99.0)
    assert config.task.key_columns == ("id", "chip_row", "chip_col")  # resume per chip
    plain, _ = parse_config([])
    assert plain.task.key_columns == ("id",) and not plain.decode_config().raster.chipped


def _item(item_id: str, href: str, when: str) -> dict:
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": "synthetic",
        "geometry": None, "bbox": None, "links": [],
        "properties": {"datetime": when},
        "assets": {"visual": {"href": href,
                              "type": "image/tiff; application=geotiff; profile=cloud-optimized"},
                   "thumbnail": {"href": "thumb.png", "type": "image/png"}},
    }


@pytest.mark.slow
def test_stac_on_s3_to_chips_to_geoparquet_then_resume(ray_local, s3, pipeline_env, demo_model,
                                                       tmp_path, capsys):
    import geopandas

    rgb = rgb_uint8_scene(tmp_path / "rgb.tif", width=600, height=400)
    u16 = uint16_nodata_scene(tmp_path / "u16.tif", width=600, height=500)
    bucket = s3.bucket
    s3.put_object(Bucket=bucket, Key="stac/scenes/rgb.tif", Body=rgb.read_bytes())
    s3.put_object(Bucket=bucket, Key="data/u16.tif", Body=u16.read_bytes())
    items = {"type": "FeatureCollection", "features": [
        _item("scene-rgb", "scenes/rgb.tif", "2024-05-01T10:30:00Z"),  # relative to the file
        _item("scene-u16", f"s3://{bucket}/data/u16.tif", "2024-06-02T11:00:00Z")]}
    s3.put_object(Bucket=bucket, Key="stac/items.json", Body=json.dumps(items).encode())
    out = tmp_path / "out"
    argv = ["--input", f"s3://{bucket}/stac/items.json", "--asset", "visual",
            "--output", str(out), "--model", str(demo_model), "--max-new-tokens", "2",
            "--batch-size", "4", "--memory-per-actor-gb", "0.5", "--chip-size", "256"]
    assert main([*argv, "--save-scene-maps", "1"]) == 0
    assert "1 scene map(s)" in capsys.readouterr().out
    assert (out / "_scenes" / "scene-rgb.png").stat().st_size > 1000  # the first scene by id

    table = pq.read_table(out)
    keys = list(zip(*(table.column(c).to_pylist() for c in ("id", "chip_row", "chip_col"))))
    assert len(keys) == len(set(keys)) == 3 * 2 + 3 * 2  # every chip exactly once
    rows = table.to_pylist()
    by_id = {}
    for row in rows:
        by_id.setdefault(row["id"], []).append(row)
    assert set(by_id) == {"scene-rgb", "scene-u16"}
    empty = sorted((r["id"], r["chip_row"], r["chip_col"]) for r in rows if r["empty"])
    assert empty == [("scene-u16", 0, 0), ("scene-u16", 1, 0)]  # the nodata margin
    assert all(r["error"] is None for r in rows)
    assert all(r["answer"] is None for r in rows if r["empty"])
    assert all(r["answer"] is not None and len(r["hr_cells"]) == 81
               for r in rows if not r["empty"])
    assert {r["collection"] for r in rows} == {"synthetic"}
    assert {r["datetime"] for r in by_id["scene-rgb"]} == {"2024-05-01T10:30:00Z"}
    assert {r["source_uri"] for r in by_id["scene-rgb"]} == {f"s3://{bucket}/stac/scenes/rgb.tif"}
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_written"] == 12 and summary["errors_by_stage"] == {}

    frame = geopandas.read_parquet(out)
    assert frame.crs.to_epsg() == 32633
    assert len(frame) == 12 and not frame.geometry.isna().any()
    assert frame.geometry.area.sum() == pytest.approx((600 * 400 + 600 * 500) * 0.25)

    assert main(argv) == 0  # a rerun: every chip is written, nothing runs again
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_written"] == 0 and summary["rows_skipped"] == 12
    assert pq.read_table(out).num_rows == 12


def _chip_keys(out) -> dict[str, list[tuple]]:
    return {p.name: list(zip(*(pq.read_table(p, columns=[c]).column(c).to_pylist()
                               for c in ("id", "chip_row", "chip_col"))))
            for p in sorted(out.glob("part-*.parquet"))}


@pytest.mark.slow
def test_killed_half_way_through_a_scene_then_rerun_each_chip_once(pipeline_env, demo_model,
                                                                   tmp_path):
    import ray

    ray.shutdown()  # the job starts its own Ray (ray_local restarts later)
    (tmp_path / "in").mkdir()
    # 100 chips; decode hands them on in Ray Data blocks of at most 128 MB (about 42 decoded
    # 1008 px chips), so the first chips are committed while the rest of the scene runs
    rgb_uint8_scene(tmp_path / "in" / "scene.tif", width=1280, height=1280)
    out = tmp_path / "out"
    n = 10 * 10
    cmd = job_command("caption_remote_sensing.py", "--input", str(tmp_path / "in"),
                      "--output", str(out), "--model", str(demo_model), "--max-new-tokens", "2",
                      "--batch-size", "4", "--rows-per-file", "1", "--chip-size", "128",
                      "--memory-per-actor-gb", "0.5")
    env, ray_tmp = job_env()
    try:
        proc = start_job(cmd, env, tmp_path / "run1.log")
        deadline = time.monotonic() + 240
        while not (list(out.glob("part-*.parquet")) if out.exists() else []):
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "run 1 wrote nothing in time"
            time.sleep(0.05)
        assert kill_job(proc)
        before = _chip_keys(out)
        done = [k for keys in before.values() for k in keys]
        assert 1 <= len(done) < n and len(set(done)) == len(done)

        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400,
                                check=False)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_skipped"] == len(done)
    assert summary["rows_written"] == n - len(done)  # only the missing chips ran
    after = _chip_keys(out)
    keys = [k for ks in after.values() for k in ks]
    assert sorted(keys) == sorted(("scene.tif", r, c) for r in range(10) for c in range(10))
    new = [k for name, ks in after.items() if name not in before for k in ks]
    assert not set(new) & set(done)


@pytest.mark.slow
def test_processor_chips_a_users_own_dataset(ray_local, demo_model, tmp_path):
    import ray

    from pipeline import ProcessorConfig, build_processor

    scene = uint16_nodata_scene(tmp_path / "u16.tif", width=600, height=500)
    ds = ray.data.from_items([{"scene": "a", "image": str(scene), "prompt": "What is here?"}])
    config = ProcessorConfig(model=str(demo_model), max_new_tokens=2, chip_size=256,
                             bands=(3, 2, 1), memory_per_replica_gb=0.5)
    rows = build_processor(config)(ds).take_all()
    assert sorted((r["chip_row"], r["chip_col"]) for r in rows) == [
        (r, c) for r in range(2) for c in range(3)]
    assert all(r["scene"] == "a" and r["error"] is None for r in rows)
    assert sum(bool(r["empty"]) for r in rows) == 2
    assert all(r["answer"] is not None for r in rows if not r["empty"])
