"""List stage: folders, globs, S3 prefixes (real moto server) and manifests."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.inputs import InputConfig, iter_inputs, list_inputs


def _tree(root):
    (root / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.PNG", "sub/c.tif", "notes.txt", ".hidden.jpg", "_tmp.png"):
        (root / name).write_bytes(b"x")
    return root


def test_folder_lists_images_recursively_with_relative_ids(tmp_path):
    table = list_inputs(InputConfig(str(_tree(tmp_path / "in"))))
    assert table.column("id").to_pylist() == ["a.PNG", "b.jpg", "sub/c.tif"]
    assert table.column("source_uri").to_pylist() == [
        str(tmp_path / "in" / p) for p in ("a.PNG", "b.jpg", "sub/c.tif")
    ]


def test_glob_ids_are_relative_to_the_glob_root(tmp_path):
    root = _tree(tmp_path / "in")
    table = list_inputs(InputConfig(f"{root}/**/*.tif"))
    assert table.column("id").to_pylist() == ["sub/c.tif"]
    table = list_inputs(InputConfig(f"{root}/*.jpg"))
    assert table.column("id").to_pylist() == ["b.jpg"]


def test_limit_keeps_the_first_inputs(tmp_path):
    table = list_inputs(InputConfig(str(_tree(tmp_path / "in")), limit=2))
    assert table.column("id").to_pylist() == ["a.PNG", "b.jpg"]


def test_single_file(tmp_path):
    root = _tree(tmp_path / "in")
    table = list_inputs(InputConfig(str(root / "b.jpg")))
    assert table.to_pylist() == [{"id": "b.jpg", "source_uri": str(root / "b.jpg")}]


def test_s3_prefix(s3):
    for key in ("tiles/x1.jpg", "tiles/deep/x2.png", "tiles/readme.md", "other/x3.jpg"):
        s3.put_object(Bucket=s3.bucket, Key=key, Body=b"x")
    table = list_inputs(InputConfig(f"s3://{s3.bucket}/tiles/"))
    assert table.column("id").to_pylist() == ["deep/x2.png", "x1.jpg"]
    assert table.column("source_uri").to_pylist() == [
        f"s3://{s3.bucket}/tiles/deep/x2.png", f"s3://{s3.bucket}/tiles/x1.jpg"
    ]
    table = list_inputs(InputConfig(f"s3://{s3.bucket}/tiles/*.jpg"))
    assert table.column("id").to_pylist() == ["x1.jpg"]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_manifest_formats(tmp_path, fmt):
    rows = [
        {"id": "q1", "image_uri": "imgs/a.png", "question": "Is there a road?",
         "ground_truth": "yes", "question_type": "presence"},
        {"id": "q2", "image_uri": "/abs/b.png", "question": "How many houses?",
         "ground_truth": "3", "question_type": "count"},
    ]
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "csv":
        lines = ["id,image_uri,question,ground_truth,question_type"]
        lines += [",".join(r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = list_inputs(InputConfig(str(path)))
    assert table.column("id").to_pylist() == ["q1", "q2"]
    assert table.column("source_uri").to_pylist() == [str(tmp_path / "imgs/a.png"), "/abs/b.png"]
    assert table.column("question").to_pylist() == ["Is there a road?", "How many houses?"]
    assert table.column("ground_truth").to_pylist() == ["yes", "3"]
    assert table.column("question_type").to_pylist() == ["presence", "count"]


def test_csv_manifest_keeps_ids_as_text(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,image_uri,ground_truth\n007,a.png,0\n010,b.png,12\n")
    table = list_inputs(InputConfig(str(path)))
    assert table.column("id").to_pylist() == ["007", "010"]
    assert table.column("ground_truth").to_pylist() == ["0", "12"]


def test_manifest_on_s3_resolves_relative_uris(s3):
    s3.put_object(Bucket=s3.bucket, Key="m/list.jsonl",
                  Body=b'{"id": 7, "path": "img/7.jpg"}\n')
    table = list_inputs(InputConfig(f"s3://{s3.bucket}/m/list.jsonl"))
    assert table.to_pylist() == [{"id": "7", "source_uri": f"s3://{s3.bucket}/m/img/7.jpg"}]


def test_manifest_errors_are_specific(tmp_path):
    bad = tmp_path / "noid.csv"
    bad.write_text("image_uri\na.png\n")
    with pytest.raises(ValueError, match="--input manifest .* needs an 'id' column"):
        list_inputs(InputConfig(str(bad)))
    nouri = tmp_path / "nouri.csv"
    nouri.write_text("id,caption\n1,x\n")
    with pytest.raises(ValueError, match="image URI column"):
        list_inputs(InputConfig(str(nouri)))
    dup = tmp_path / "dup.csv"
    dup.write_text("id,image_uri\n1,a.png\n1,b.png\n")
    with pytest.raises(ValueError, match=r"duplicate ids \['1'\]"):
        list_inputs(InputConfig(str(dup)))


def test_nothing_found_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--input .*no such"):
        list_inputs(InputConfig(str(tmp_path / "absent")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--input .*found no images"):
        list_inputs(InputConfig(str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="--limit"):
        InputConfig(str(tmp_path), limit=0)


def _shard(path, rows):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("id,image_uri\n" + "".join(f"{r['id']},{r['image_uri']}\n" for r in rows))


def test_folder_of_manifest_shards_in_name_order(tmp_path):
    (tmp_path / "m").mkdir()
    _shard(tmp_path / "m" / "part-1.csv", [{"id": "010", "image_uri": "x/c.png"}])
    _shard(tmp_path / "m" / "part-0.parquet", [{"id": "a", "image_uri": "x/a.png"},
                                               {"id": "b", "image_uri": "/abs/b.png"}])
    table = list_inputs(InputConfig(str(tmp_path / "m")))
    assert table.column("id").to_pylist() == ["a", "b", "010"]
    assert table.column("source_uri").to_pylist() == [
        str(tmp_path / "m/x/a.png"), "/abs/b.png", str(tmp_path / "m/x/c.png")]
    _shard(tmp_path / "m" / "part-2.csv", [{"id": "a", "image_uri": "again.png"}])
    with pytest.raises(ValueError, match=r"duplicate ids \['a'\]"):  # across shards
        list_inputs(InputConfig(str(tmp_path / "m")))


def test_inputs_come_in_blocks_with_the_limit_across_them(tmp_path):
    rows = [{"id": f"t{i:03d}", "image_uri": f"../img/{i % 3}.jpg"} for i in range(250)]
    _shard(tmp_path / "m.parquet", rows)
    blocks = list(iter_inputs(InputConfig(str(tmp_path / "m.parquet")), block_rows=100))
    assert [b.num_rows for b in blocks] == [100, 100, 50]
    assert blocks[2].column("id").to_pylist()[-1] == "t249"
    assert blocks[0].column("source_uri").to_pylist()[:2] == [
        str(tmp_path.parent / "img/0.jpg"), str(tmp_path.parent / "img/1.jpg")]  # normalised
    limited = list(iter_inputs(InputConfig(str(tmp_path / "m.parquet"), limit=130),
                               block_rows=100))
    assert [b.num_rows for b in limited] == [100, 30]
    assert rebatch_sizes([3, 4, 0, 5], 4) == [4, 4, 4]


def rebatch_sizes(sizes, rows):
    from pipeline.inputs import rebatch

    tables = [pa.table({"x": pa.array(range(n), pa.int64())}) for n in sizes]
    return [t.num_rows for t in rebatch(tables, rows)]


def test_nested_s3_prefix_is_listed_in_parallel_like_a_flat_listing(s3):
    from pipeline.inputs import LIST_THREADS, find_files
    from pipeline.storage import open_fs

    keys = [f"tiles/{z}/{x}/t{i}.jpg" for z in ("z1", "z2") for x in range(LIST_THREADS + 2)
            for i in range(2)]
    keys += ["tiles/top.jpg", "tiles/z1/readme.md"]
    for key in keys:
        s3.put_object(Bucket=s3.bucket, Key=key, Body=b"x")
    fs, root = open_fs(f"s3://{s3.bucket}/tiles/")
    assert sorted(find_files(fs, root)) == sorted(f"{s3.bucket}/{k}" for k in keys)
    table = list_inputs(InputConfig(f"s3://{s3.bucket}/tiles/"))
    assert table.num_rows == len(keys) - 1  # not the readme
    assert table.column("id").to_pylist() == sorted(k.removeprefix("tiles/") for k in keys
                                                    if k.endswith(".jpg"))
