"""Make the synthetic high-resolution remote-sensing samples used by `make demo`.

The images are drawn, not downloaded: patchworks of fields, roads, a river and bright roofs,
at 1600-2500 px so they exercise the pad-and-resize path to 1008 px. Deterministic (fixed
seeds), so re-running rewrites the same files.

    python samples/make_samples.py [--out samples/remote_sensing] [--scenes samples/scenes]

`--scenes` gets one georeferenced scene for the chipping demo: a Cloud-Optimised GeoTIFF in
UTM zone 33N at 0.25 m per pixel (JPEG tiles of 512 px, overviews), under 1 MB.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (file name, width, height, seed)
SAMPLES = [
    ("farmland_2400x1600.jpg", 2400, 1600, 1),
    ("crossroads_1600x2200.jpg", 1600, 2200, 2),
    ("river_valley_2500x1400.jpg", 2500, 1400, 3),
    ("village_1800x1800.jpg", 1800, 1800, 4),
    ("landcover_map_2000x1500.png", 2000, 1500, 5),
]

FIELD_COLOURS = [(112, 130, 62), (150, 140, 80), (90, 110, 50), (170, 150, 100), (70, 95, 45)]
# (file name, width, height, seed): the georeferenced scene (chipped at 1008 px: 3 x 2 chips)
SCENE = ("orthophoto_utm33n_2200x1800.tif", 2200, 1800, 6)
SCENE_CRS = "EPSG:32633"
SCENE_ORIGIN = (512_000.0, 5_043_000.0)  # upper-left corner, metres (near Graz, Austria)
SCENE_RES = 0.25
LANDCOVER_COLOURS = [(0, 100, 0), (240, 230, 140), (0, 0, 200), (200, 0, 0), (128, 128, 128)]


def _texture(rng: np.random.Generator, width: int, height: int, scale: int = 16) -> np.ndarray:
    """Smooth low-amplitude noise: drawn coarse, upsampled, so JPEG stays small."""
    coarse = rng.normal(0.0, 1.0, (height // scale + 1, width // scale + 1)).astype(np.float32)
    img = Image.fromarray(((coarse * 20) + 128).clip(0, 255).astype(np.uint8))
    img = img.resize((width, height), Image.Resampling.BICUBIC)
    return (np.asarray(img, dtype=np.float32) - 128.0) / 20.0


def _fields(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int,
            colours: list[tuple[int, int, int]]) -> None:
    y = 0
    while y < height:
        row_h = int(rng.integers(150, 400))
        x = 0
        while x < width:
            col_w = int(rng.integers(200, 600))
            colour = colours[int(rng.integers(len(colours)))]
            draw.rectangle([x, y, x + col_w, y + row_h], fill=colour)
            x += col_w
        y += row_h


def _roads(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    for _ in range(2):
        x0, x1 = int(rng.integers(0, width)), int(rng.integers(0, width))
        draw.line([(x0, 0), (x1, height)], fill=(200, 200, 195), width=18)
    y0, y1 = int(rng.integers(0, height)), int(rng.integers(0, height))
    draw.line([(0, y0), (width, y1)], fill=(185, 185, 180), width=14)


def _river(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    xs = np.linspace(0, width, 40)
    ys = height / 2 + np.cumsum(rng.normal(0, 25, xs.size))
    draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(40, 70, 110), width=60)


def _roofs(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int,
           count: int) -> None:
    for _ in range(count):
        w, h = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        draw.rectangle([x, y, x + w, y + h], fill=(245, 240, 230))


def make_photo(width: int, height: int, seed: int, kind: str) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    _fields(draw, rng, width, height, FIELD_COLOURS)
    if kind in ("crossroads", "village", "farmland"):
        _roads(draw, rng, width, height)
    if kind == "river_valley":
        _river(draw, rng, width, height)
    _roofs(draw, rng, width, height, count=40 if kind == "village" else 6)
    # One large bright rectangle: the detail a high-resolution view should find.
    bx, by = int(width * 0.7), int(height * 0.2)
    draw.rectangle([bx, by, bx + width // 12, by + height // 16], fill=(255, 255, 255))
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    arr = np.asarray(img, dtype=np.float32) + 10.0 * _texture(rng, width, height)[..., None]
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def make_landcover(width: int, height: int, seed: int) -> Image.Image:
    """A classified land-cover map: palette ("P") image, so decode sees a non-RGB mode."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    _fields(draw, rng, width, height, LANDCOVER_COLOURS)
    _river(draw, rng, width, height)
    _roofs(draw, rng, width, height, count=25)
    return img.quantize(colors=8, dither=Image.Dither.NONE)


def make_scene(path: Path) -> None:
    """The georeferenced sample: a village photo as a JPEG-compressed COG with a UTM CRS."""
    import rasterio
    import rasterio.shutil
    from rasterio.enums import ColorInterp
    from rasterio.io import MemoryFile
    from rasterio.transform import from_origin

    _, width, height, seed = SCENE
    data = np.moveaxis(np.asarray(make_photo(width, height, seed, "village")), -1, 0)
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3,
               "dtype": "uint8", "crs": SCENE_CRS,
               "transform": from_origin(*SCENE_ORIGIN, SCENE_RES, SCENE_RES)}
    with MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(data)
            ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
        with mem.open() as ds:
            rasterio.shutil.copy(ds, str(path), driver="COG", blocksize=512, compress="JPEG",
                                 quality=80, overview_resampling="average")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "remote_sensing")
    parser.add_argument("--scenes", type=Path, default=Path(__file__).parent / "scenes")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, width, height, seed in SAMPLES:
        path = args.out / name
        kind = name.split("_")[0] if not name.startswith("river") else "river_valley"
        if name.endswith(".png"):
            make_landcover(width, height, seed).save(path, optimize=True)
        else:
            make_photo(width, height, seed, kind).save(path, quality=85, optimize=True)
        total += path.stat().st_size
        print(f"{path}  {width}x{height}  {path.stat().st_size / 1e3:.0f} kB")
    print(f"total {total / 1e6:.2f} MB")
    args.scenes.mkdir(parents=True, exist_ok=True)
    scene = args.scenes / SCENE[0]
    make_scene(scene)
    print(f"{scene}  {SCENE[1]}x{SCENE[2]}  {SCENE_CRS}  {scene.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
