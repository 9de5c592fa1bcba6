"""Raster benchmark: windowed reads of a Cloud-Optimised GeoTIFF on object storage through
`pipeline.raster`, on a moto S3 server on 127.0.0.1.

    python bench/raster_bench.py --size 10000 --chip 1008 --out bench/results/raster.json

Writes a SIZE x SIZE 3-band uint16 COG (UTM, 512 px deflate tiles, overviews; a smooth
field plus noise, so it compresses like imagery rather than like noise), uploads it, then:

- **chips**: opens the scene as a decode task does (header, then the per-band stretch from an
  overview) and reads every chip of the `--chip` grid in row-major order, as `scene_rows`
  does, counting the bytes each one fetched. A chip's share of the file is the full-resolution
  tile data (the file less its header and overviews) times the chip's part of the scene's
  area. Chips whose windows cut tiles read the tiles they touch; tiles shared with an earlier
  chip come from GDAL's block cache, so the whole grid reads each tile about once;
- **a chip alone**: every chip again from a fresh open (a cold block cache), its bytes
  against its share: the cost of one chip without neighbours (tiles it cuts are whole reads);
- **chips/s per decode core**: the same loop's chips over its wall time, in one process and
  one thread (GDAL decompresses on the calling thread), on the file local (the decode work
  alone) and on S3. Moto answers a range request by copying the whole object, so the S3 pass
  measures moto more than the decode (see bench/RESULTS.md);
- **whole-scene shrink**: a fresh open, then the scene read whole at `--image-size` (GDAL
  takes the overview closest to it), its bytes against the file's.

The bytes are counted in the fsspec file objects that rasterio reads through
(`pipeline.raster._opener`, wrapped here), i.e. exactly what was requested from S3.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BUCKET = "bench"
KEY = "scenes/scene.tif"


def write_scene(path: Path, size: int) -> None:
    """SIZE x SIZE x 3 uint16 COG, written in strips (never the whole array in memory)."""
    import rasterio
    import rasterio.shutil
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    tmp = path.with_suffix(".strips.tif")
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3,
               "dtype": "uint16", "crs": "EPSG:32633", "tiled": True, "blockxsize": 512,
               "blockysize": 512, "compress": "deflate", "predictor": 2,
               "transform": from_origin(500_000, 4_600_000, 0.3, 0.3)}
    rng = np.random.default_rng(0)
    xs = np.arange(size) / size
    with rasterio.open(tmp, "w", **profile) as ds:
        for top in range(0, size, 512):
            rows = min(512, size - top)
            ys = (top + np.arange(rows))[:, None] / size
            field = np.sin(12 * xs[None, :] + 7 * ys) * np.cos(9 * ys - 5 * xs[None, :])
            strip = [1500 + 600 * k + 900 * field + rng.normal(0, 40, (rows, size))
                     for k in range(3)]
            ds.write(np.stack(strip).clip(0, 65535).astype(np.uint16),
                     window=Window(0, top, size, rows))
    with rasterio.open(tmp) as src:
        rasterio.shutil.copy(src, str(path), driver="COG", blocksize=512, compress="deflate",
                             predictor=2, overview_resampling="average", num_threads="ALL_CPUS")
    tmp.unlink()


def full_resolution_bytes(path: Path) -> int:
    """The tile data of the full-resolution image (the file less header and overviews)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return int(sum(tif.pages[0].databytecounts))


class Counter:
    bytes = 0


def counting_opener(counter: Counter):
    """`pipeline.raster._opener`, with every byte its file objects return counted."""
    from pipeline import raster

    original = raster._opener

    def make(fs):
        inner = original(fs)

        def opener(path, mode="rb"):
            f = inner(path, mode)
            read = f.read

            def counted(*args):
                data = read(*args)
                counter.bytes += len(data)
                return data

            f.read = counted
            return f

        return opener

    raster._opener = make


def chip_pass(uri: str, chip: int, image_size: int, counter: Counter,
              label: str = "") -> dict:
    from flexattn.options import PAD_COLOUR
    from pipeline import raster

    config = raster.RasterConfig(chip_size=chip)
    start_bytes = counter.bytes
    start = time.perf_counter()
    with raster.open_scene(uri) as ds:
        bands = raster.select_bands(ds, None)
        limits = raster.band_limits(ds, bands, config.stretch)
        header_bytes = counter.bytes - start_bytes
        scene = raster.Scene(ds, bands, limits, PAD_COLOUR)
        per_chip = []
        for row, col, box in raster.grid(ds.width, ds.height, chip, chip):
            before = counter.bytes
            out = scene.chip(row, col, box, 1.0, chip, image_size)
            assert out.error is None, out.error
            per_chip.append((box[2] * box[3], counter.bytes - before))
            if label and len(per_chip) % 10 == 0:
                print(f"{label}: {len(per_chip)} chips in {time.perf_counter() - start:.0f} s",
                      flush=True)
        width, height = ds.width, ds.height
    elapsed = time.perf_counter() - start
    return {"header_and_stats_bytes": header_bytes, "per_chip": per_chip,
            "seconds": elapsed, "area": width * height}


def isolated_pass(uri: str, chip: int, image_size: int, counter: Counter,
                  sample: int) -> list[tuple]:
    """`sample` chips spread over the grid, each read alone from a fresh open (a cold block
    cache): what one chip costs without the neighbours that share its tiles."""
    from flexattn.options import PAD_COLOUR
    from pipeline import raster

    with raster.open_scene(uri) as ds:
        cells = raster.grid(ds.width, ds.height, chip, chip)
    cells = cells[::max(1, len(cells) // sample)][:sample]
    out = []
    for row, col, box in cells:
        with raster.open_scene(uri) as ds:
            scene = raster.Scene(ds, raster.select_bands(ds, None), None, PAD_COLOUR)
            before = counter.bytes
            scene.chip(row, col, box, 1.0, chip, image_size)
            out.append((box[2] * box[3], counter.bytes - before))
    return out


def whole_pass(uri: str, image_size: int, counter: Counter) -> tuple[int, float]:
    """The scene shrunk whole, from a fresh open: (bytes, seconds)."""
    from flexattn.options import PAD_COLOUR
    from pipeline import raster

    before = counter.bytes
    start = time.perf_counter()
    [whole] = list(raster.scene_rows(uri, raster.RasterConfig(), image_size, PAD_COLOUR))
    assert whole.error is None, whole.error
    return counter.bytes - before, time.perf_counter() - start


def summarize(chips: dict, isolated: list, file_bytes: int, data_bytes: int, whole_bytes: int,
              whole_s: float) -> dict:
    def share(pairs):
        ratios = [b / (data_bytes * a / chips["area"]) for a, b in pairs]
        return {"mean": float(np.mean(ratios)), "median": float(np.median(ratios)),
                "max": float(np.max(ratios)), "min": float(np.min(ratios))}

    n = len(chips["per_chip"])
    return {
        "chips": n, "file_bytes": file_bytes, "full_resolution_bytes": data_bytes,
        "header_and_stats_bytes": chips["header_and_stats_bytes"],
        "chip_bytes_over_share_in_grid": share(chips["per_chip"]),
        "chip_bytes_over_share_alone": share(isolated),
        "all_chips_bytes_over_full_resolution":
            sum(b for _, b in chips["per_chip"]) / data_bytes,
        "chips_per_s_one_core_s3": n / chips["seconds"], "chip_pass_s3_s": chips["seconds"],
        "whole_scene_bytes": whole_bytes, "whole_scene_over_file": whole_bytes / file_bytes,
        "whole_scene_s": whole_s, "cpu": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    from list_bench import start_moto
    from model_bench import bench_parser, positive_int, provenance, source_commit, write_json

    p = bench_parser(__doc__)
    p.add_argument("--size", type=positive_int, default=10_000, help="scene side, pixels")
    p.add_argument("--chip", type=positive_int, default=1008, help="chip side, pixels")
    p.add_argument("--image-size", type=positive_int, default=1008)
    p.add_argument("--alone", type=positive_int, default=20,
                   help="chips (spread over the grid) also read alone, from a fresh open")
    p.add_argument("--scene", type=Path, default=None,
                   help="keep the COG here and reuse it when it exists (default: a temporary "
                        "file)")
    args = p.parse_args(argv)
    commit = source_commit()

    import boto3

    moto = start_moto()
    counter = Counter()
    counting_opener(counter)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = args.scene or Path(tmp) / "scene.tif"
            if not path.exists():
                start = time.perf_counter()
                write_scene(path, args.size)
                print(f"wrote the COG in {time.perf_counter() - start:.0f} s", flush=True)
            file_bytes, data_bytes = path.stat().st_size, full_resolution_bytes(path)
            # decode speed on one core, the file local (no object store in the way)
            local = chip_pass(str(path), args.chip, args.image_size, counter, "local")
            client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
            client.create_bucket(Bucket=BUCKET)
            client.upload_file(str(path), BUCKET, KEY)
        uri = f"s3://{BUCKET}/{KEY}"
        chips = chip_pass(uri, args.chip, args.image_size, counter, "s3")
        isolated = isolated_pass(uri, args.chip, args.image_size, counter, args.alone)
        whole_bytes, whole_s = whole_pass(uri, args.image_size, counter)
    finally:
        os.killpg(moto.pid, signal.SIGKILL)
        moto.wait()

    result = {**provenance(commit), "size": args.size, "chip": args.chip,
              **summarize(chips, isolated, file_bytes, data_bytes, whole_bytes, whole_s),
              "chips_per_s_one_core_local_file": len(local["per_chip"]) / local["seconds"]}
    write_json(args.out, result)
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
