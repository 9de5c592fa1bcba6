"""Remote-sensing scenes through rasterio, decoded directly (no cluster): chip grid,
footprints, nodata, per-band stretch, bands, error rows, object storage, GeoParquet."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.decode import PAD_COLOUR, DecodeConfig, decode_batch
from pipeline.geo import CHIP_KEYS, footprint, geoparquet_metadata
from pipeline.predict import tensor_column
from pipeline.raster import RasterConfig, grid
from tests.pipeline.rasters import MARGIN, RES, rgb_uint8_scene, uint16_nodata_scene, write_cog


def _decode(paths, **raster) -> pa.Table:
    size = raster.pop("image_size", 256)
    batch = pa.table({"id": [f"s{i}" for i in range(len(paths))],
                      "source_uri": [str(p) for p in paths]})
    return decode_batch(batch, DecodeConfig(image_size=size, raster=RasterConfig(**raster)))


def _chips(table: pa.Table) -> dict[tuple[int, int], tuple[dict, np.ndarray]]:
    images = tensor_column(table, "image")
    return {(r["chip_row"], r["chip_col"]): (r, images[i])
            for i, r in enumerate(table.drop_columns(["image"]).to_pylist())}


def test_grid_reaches_every_edge_with_the_stride():
    cells = grid(1200, 900, 256, 224)
    assert len(cells) == 6 * 4
    xs = sorted({c[2][0] for c in cells})
    assert xs == [0, 224, 448, 672, 896, 1120]
    assert max(x + w for _, _, (x, _, w, _) in cells) == 1200
    assert max(y + h for _, _, (_, y, _, h) in cells) == 900
    assert grid(100, 80, 256, 256) == [(0, 0, (0, 0, 100, 80))]


def test_uint8_scene_chips_and_footprints_equal_the_window_transform(tmp_path):
    import rasterio
    import shapely
    from rasterio.windows import Window

    path = rgb_uint8_scene(tmp_path / "rgb.tif")
    table = _decode([path], chip_size=256)
    assert table.num_rows == 5 * 4  # ceil(1200 / 256) x ceil(900 / 256)
    assert table.column("error").null_count == table.num_rows
    assert set(table.column("crs").to_pylist()) == {"EPSG:32633"}
    with rasterio.open(path) as ds:
        data = ds.read()
        for (r, c), (row, image) in _chips(table).items():
            w = row["window"]
            assert (w["x"], w["y"]) == (256 * c, 256 * r)
            assert (w["width"], w["height"]) == (min(256, 1200 - w["x"]), min(256, 900 - w["y"]))
            local = ds.window_transform(Window(w["x"], w["y"], w["width"], w["height"]))
            want = [local @ xy for xy in ((0, 0), (w["width"], 0),
                                          (w["width"], w["height"]), (0, w["height"]))]
            got = shapely.get_coordinates(footprint(row["geometry"]))[:4]
            assert np.abs(got - np.array(want)).max() < 1e-6
            assert footprint(row["geometry"]).area == pytest.approx(
                w["width"] * w["height"] * RES * RES, abs=1e-6)
            box = row["bbox_lonlat"]
            assert 14.9 < box["xmin"] < box["xmax"] < 15.1 and 41 < box["ymin"] < box["ymax"] < 42
            # native resolution: the chip is the scene's own pixels, edge chips padded after
            part = image[:w["height"], :w["width"]]
            scene = data[:, w["y"]:w["y"] + w["height"], w["x"]:w["x"] + w["width"]]
            assert np.array_equal(part, np.moveaxis(scene, 0, -1))
            assert (image[w["height"]:] == PAD_COLOUR).all()
            assert (image[:, w["width"]:] == PAD_COLOUR).all()


def test_nodata_chips_are_marked_empty_once_and_painted_with_the_pad_colour(tmp_path):
    path = uint16_nodata_scene(tmp_path / "u16.tif")
    table = _decode([path], chip_size=256)
    chips = _chips(table)
    assert len(chips) == table.num_rows == 5 * 4
    empty = sorted(k for k, (row, _) in chips.items() if row["empty"])
    assert empty == [(r, 0) for r in range(4)]  # x 0..256 lies in the 300 px nodata margin
    assert table.column("error").null_count == table.num_rows  # empty is not an error
    _, image = chips[(0, 1)]  # x 256..512: columns 256..300 are nodata
    assert (image[:, :MARGIN - 256] == PAD_COLOUR).all()
    assert not (image[:, MARGIN - 256:] == PAD_COLOUR).all(axis=-1).any()


def test_per_band_stretch_is_shared_by_the_chips_no_seam(tmp_path):
    path = uint16_nodata_scene(tmp_path / "u16.tif")
    chips = _chips(_decode([path], chip_size=256, chip_overlap=32))
    (a, left), (b, right) = chips[(1, 2)], chips[(1, 3)]
    assert b["window"]["x"] - a["window"]["x"] == 224
    assert np.array_equal(left[:, 224:], right[:, :32])  # the shared 32 columns agree exactly
    valid = np.concatenate([img[:row["window"]["height"], :row["window"]["width"]].reshape(-1, 3)
                            for row, img in chips.values() if not row["empty"]])
    valid = valid[~(valid == PAD_COLOUR).all(axis=1)]
    for band in range(3):  # each band spans the range on its own (around 1000 x band number)
        low, high = np.percentile(valid[:, band], [2, 98])
        assert low < 15 and high > 240, (band, low, high)


def test_bands_order_is_honoured(tmp_path):
    path = uint16_nodata_scene(tmp_path / "u16.tif")

    def chip(bands=None):  # a chip inside the valid data (x 512..768, y 256..512)
        return _chips(_decode([path], chip_size=256, bands=bands))[(1, 2)][1]

    first = chip((1, 2, 3))
    swapped, fourth = chip((4, 2, 1)), chip((4, 4, 4))
    assert np.array_equal(chip(), first)  # no colour interpretation: the first three
    assert np.array_equal(swapped[..., 2], first[..., 0])
    assert np.array_equal(swapped[..., 1], first[..., 1])
    assert np.array_equal(swapped[..., 0], fourth[..., 0])
    assert not np.array_equal(swapped[..., 0], first[..., 2])


def test_colour_interpretation_picks_red_green_blue(tmp_path):
    from rasterio.enums import ColorInterp

    from tests.pipeline.rasters import scene_array

    data = scene_array(3, 300, 400, "uint8")
    path = write_cog(tmp_path / "bgr.tif", data,
                     colorinterp=[ColorInterp.blue, ColorInterp.green, ColorInterp.red])
    table = _decode([path], chip_size=512, image_size=512)
    image = tensor_column(table, "image")[0]
    assert np.array_equal(image[:300, :400, 0], data[2])  # red is band 3
    assert np.array_equal(image[:300, :400, 2], data[0])


def test_whole_scene_is_one_row_from_an_overview(tmp_path):
    path = uint16_nodata_scene(tmp_path / "u16.tif")
    [row] = _decode([path]).drop_columns(["image"]).to_pylist()
    assert (row["width"], row["height"]) == (1100, 1000)
    assert row["chip_row"] is None and row["chip_col"] is None and row["empty"] is False
    assert row["window"] == {"x": 0, "y": 0, "width": 1100, "height": 1000}
    assert footprint(row["geometry"]).area == pytest.approx(1100 * 1000 * RES * RES)


def test_gsd_resamples_and_the_window_stays_in_native_pixels(tmp_path):
    path = rgb_uint8_scene(tmp_path / "rgb.tif")
    table = _decode([path], chip_size=256, gsd=2 * RES)  # 256 px chips of 512 native px
    chips = _chips(table)
    assert len(chips) == 3 * 2
    row, image = chips[(1, 2)]
    assert row["window"] == {"x": 1024, "y": 512, "width": 176, "height": 388}
    assert (image[:194, :88] != PAD_COLOUR).any(axis=-1).all()
    assert (image[:, 88:] == PAD_COLOUR).all() and (image[194:] == PAD_COLOUR).all()
    assert footprint(row["geometry"]).area == pytest.approx(176 * 388 * RES * RES)


def test_corrupt_and_missing_scenes_are_one_error_row_each(tmp_path):
    good = rgb_uint8_scene(tmp_path / "good.tif")
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(good.read_bytes()[:600])  # the header, then nothing
    table = _decode([corrupt, tmp_path / "missing.tif", good], chip_size=512)
    rows = table.drop_columns(["image"]).to_pylist()
    assert [r["id"] for r in rows].count("s0") == 1 and [r["id"] for r in rows].count("s1") == 1
    bad = {r["id"]: r for r in rows if r["error"] is not None}
    assert set(bad) == {"s0", "s1"}
    assert bad["s0"]["error_stage"] == "decode" and bad["s0"]["chip_row"] is None
    assert bad["s1"]["error_stage"] == "read" and "FileNotFoundError" in bad["s1"]["error"]
    assert sum(r["id"] == "s2" for r in rows) == 3 * 2


def test_plain_images_chip_the_same_way_with_null_geography(tmp_path):
    from tests.helpers import noise_image

    noise_image(600, 300, seed=3).save(tmp_path / "photo.png")
    table = _decode([tmp_path / "photo.png"], chip_size=256)
    rows = table.drop_columns(["image"]).to_pylist()
    assert [(r["chip_row"], r["chip_col"]) for r in rows] == [(r, c) for r in range(2)
                                                              for c in range(3)]
    assert all(r["geometry"] is None and r["crs"] is None for r in rows)
    assert rows[-1]["window"] == {"x": 512, "y": 256, "width": 88, "height": 44}


def test_s3_scene_reads_like_the_local_one(tmp_path, s3):
    path = uint16_nodata_scene(tmp_path / "u16.tif")
    s3.put_object(Bucket=s3.bucket, Key="scenes/u16.tif", Body=path.read_bytes())
    local = _decode([path], chip_size=512)
    remote = _decode([f"s3://{s3.bucket}/scenes/u16.tif"], chip_size=512)
    assert remote.column("error").null_count == remote.num_rows == 3 * 2
    assert np.array_equal(tensor_column(local, "image"), tensor_column(remote, "image"))
    assert remote.column("geometry").equals(local.column("geometry"))


def test_geoparquet_metadata_gives_geopandas_the_crs(tmp_path):
    import geopandas

    from pipeline.columns import output_schema
    from pipeline.tasks import CAPTION
    from pipeline.write import ParquetSink

    path = rgb_uint8_scene(tmp_path / "rgb.tif")
    table = _decode([path], chip_size=512).drop_columns(["image"])
    sink = ParquetSink(str(tmp_path / "out"), output_schema(CAPTION.extra_fields), CHIP_KEYS,
                       file_metadata=CAPTION.file_metadata)
    sink.write([table], None)
    frame = geopandas.read_parquet(tmp_path / "out")
    assert frame.crs.to_epsg() == 32633
    assert len(frame) == 6 and frame.geometry.name == "geometry"
    assert frame.geometry.total_bounds == pytest.approx([500000, 4600000 - 450, 500600, 4600000])
    assert geoparquet_metadata(pa.table({"id": ["a"]})) == {}


def test_scene_map_draws_the_grid_and_the_cells_each_chip_used(tmp_path):
    from PIL import Image

    from pipeline.columns import output_schema
    from pipeline.scenemap import MAP_SIDE, save_scene_maps
    from pipeline.tasks import CAPTION
    from pipeline.write import ParquetSink

    path = uint16_nodata_scene(tmp_path / "u16.tif")  # 1100 x 1000, chips of 512: 3 x 2
    table = _decode([path], chip_size=512).drop_columns(["image"])
    cells = [False] * 81
    cells[0] = True  # chip (0, 1): its top-left cell
    hr = [cells if (r, c) == (0, 1) else [False] * 81
          for r, c in zip(table.column("chip_row").to_pylist(),
                          table.column("chip_col").to_pylist())]
    table = table.append_column("hr_cells", pa.array(hr, pa.list_(pa.bool_())))
    out = tmp_path / "out"
    ParquetSink(str(out), output_schema(CAPTION.extra_fields), CHIP_KEYS).write([table], None)
    [uri] = save_scene_maps(str(out), 3, RasterConfig(chip_size=512))
    assert uri.endswith("/_scenes/s0.png")
    image = np.asarray(Image.open(out / "_scenes" / "s0.png").convert("RGB")).astype(int)
    assert image.shape == (round(1000 * MAP_SIDE / 1100), MAP_SIDE, 3)
    scale = MAP_SIDE / 1100
    green = (image[..., 1] > 200) & (image[..., 0] < 120) & (image[..., 2] < 120)
    ys, xs = np.nonzero(green)
    # the cell: x 512..512 + 512 / 9, y 0..512 / 9 in scene pixels
    assert xs.min() >= 512 * scale - 2 and xs.max() <= (512 + 512 / 9) * scale + 2
    assert ys.max() <= 512 / 9 * scale + 2
    white = (image > 240).all(axis=-1)  # chip edges
    assert white[:, round(512 * scale)].mean() > 0.9


def test_jpeg2000_scene_through_gdal(tmp_path):
    import rasterio
    import rasterio.shutil

    cog = rgb_uint8_scene(tmp_path / "rgb.tif", width=600, height=400)
    with rasterio.open(cog) as src:
        rasterio.shutil.copy(src, str(tmp_path / "rgb.jp2"), driver="JP2OpenJPEG",
                             QUALITY=100, REVERSIBLE="YES")
    [row] = _decode([tmp_path / "rgb.jp2"]).drop_columns(["image"]).to_pylist()
    assert row["error"] is None and (row["width"], row["height"]) == (600, 400)
    assert row["crs"] == "EPSG:32633"
    assert footprint(row["geometry"]).area == pytest.approx(600 * 400 * RES * RES)


def test_input_columns_named_like_the_geo_columns_are_replaced(tmp_path):
    from pipeline.columns import conform, output_schema
    from pipeline.tasks import CAPTION

    path = rgb_uint8_scene(tmp_path / "rgb.tif", width=300, height=200)
    batch = pa.table({"id": ["a"], "source_uri": [str(path)], "crs": ["mine"],
                      "datetime": pa.array([20240501], pa.int64())})
    out = decode_batch(batch, DecodeConfig(image_size=64, raster=RasterConfig()))
    assert out.column_names.count("crs") == 1 and out.column("crs")[0].as_py() == "EPSG:32633"
    written = conform(out.drop_columns(["image"]), output_schema(CAPTION.extra_fields))
    assert written.column("datetime")[0].as_py() == "20240501"  # a manifest's own column
