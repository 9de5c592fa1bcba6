"""Remote-sensing scenes through rasterio (GDAL): windowed reads, bands, per-band stretch,
nodata, native-resolution chips (docs/DESIGN.md section 8).

A decode task calls `scene_rows(source, uri, config)` for a GeoTIFF / COG / JPEG2000 (by file
name ending, `RASTER_EXTENSIONS`, or TIFF / JP2 bytes); it opens the scene (the header only:
on object storage through `pipeline.storage`'s fsspec filesystem as rasterio's `opener`, so
credentials and endpoints come from the environment as for every other read) and yields one
`SceneRow` per chip, or one for the whole scene:

- **bands**: `--bands 4,3,2` (1-based, GDAL's numbering), else the bands whose colour
  interpretation is red, green, blue, else the first three (one band: grey);
- **stretch**: data above 8 bits is stretched per band between the `--stretch LOW,HIGH`
  percentiles (default 2, 98) of the valid pixels of one overview read (long side
  `STATS_SIDE`), once per scene, so all its chips share the stretch and no seam appears;
  8-bit data is taken as it is;
- **nodata**: the dataset mask (nodata values, internal masks, alpha) is painted with the pad
  colour and never enters the stretch; a chip with no valid pixel is a row marked `empty`
  (its pixels are not read);
- **chips** (`--chip-size`, `--chip-overlap`): a grid of windows with stride size - overlap,
  the last row / column reaching the scene's edge; an edge chip is padded at its right and
  bottom with the pad colour, not stretched. `--gsd` first resamples a georeferenced scene to
  that ground sample distance: each window then spans chip_size * gsd / resolution native
  pixels and is read resampled to chip_size (GDAL picks an overview when shrinking);
- **whole scene** (no `--chip-size`): read at most `image_size` on its long side, from the
  overview GDAL picks, then padded and resized as any image.

Each read goes through `read(window=...)`: a COG's internal tiles are fetched by range
requests, so a chip reads about its share of the file. A scene that cannot be opened is one
error row (stage `read` when the object is missing or unreadable, `decode` when GDAL refuses
it); a chip that fails to read is an error row for that chip and the other chips go on.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline.geo import window_columns
from pipeline.storage import is_local, open_fs, retrying

logger = logging.getLogger(__name__)

RASTER_EXTENSIONS = (".tif", ".tiff", ".jp2", ".j2k", ".vrt", ".img")
RASTER_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"\x00\x00\x00\x0cjP  ")
STATS_SIDE = 1024  # long side of the overview read for the per-scene stretch
REMOTE_BLOCK = 64 * 1024  # the first bytes of a remote scene (its header) are cached
GDAL_OPTIONS = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}  # no sidecar file look-ups


@dataclass(frozen=True)
class RasterConfig:
    chip_size: int | None = None  # None: each scene is one row, shrunk whole
    chip_overlap: int = 0
    gsd: float | None = None  # metres per pixel to resample georeferenced scenes to
    bands: tuple[int, ...] | None = None  # 1-based; None: colour interpretation, first three
    stretch: tuple[float, float] = (2.0, 98.0)  # percentiles, per band, above 8 bits

    def __post_init__(self) -> None:
        if self.chip_size is not None and self.chip_size < 1:
            raise ValueError(f"--chip-size must be >= 1 pixel, got {self.chip_size}")
        if self.chip_overlap < 0 or (self.chip_size is not None
                                     and self.chip_overlap >= self.chip_size):
            raise ValueError(f"--chip-overlap must be >= 0 and below --chip-size, got "
                             f"{self.chip_overlap}")
        if self.chip_size is None and self.chip_overlap:
            raise ValueError("--chip-overlap needs --chip-size")
        if self.gsd is not None and not (self.gsd > 0 and math.isfinite(self.gsd)):
            raise ValueError(f"--gsd must be a positive number of metres, got {self.gsd}")
        if self.gsd is not None and self.chip_size is None:
            raise ValueError("--gsd needs --chip-size (a scene shrunk whole has no fixed scale)")
        if self.bands is not None:
            object.__setattr__(self, "bands", tuple(self.bands))
            if len(self.bands) not in (1, 3) or any(b < 1 for b in self.bands):
                raise ValueError(f"--bands must be one or three 1-based band numbers, got "
                                 f"{','.join(map(str, self.bands))}")
        low, high = self.stretch
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"--stretch must be LOW,HIGH percentiles with 0 <= LOW < HIGH <= "
                             f"100, got {low:g},{high:g}")

    @property
    def chipped(self) -> bool:
        return self.chip_size is not None


def parse_numbers(text: str, flag: str, kind=float) -> tuple:
    """`"4,3,2"` -> (4, 3, 2); a ValueError naming `flag` for anything else."""
    try:
        return tuple(kind(part) for part in str(text).split(","))
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def handles(source) -> bool:
    """Whether a row's image goes through rasterio: a raster file name, or raster bytes."""
    if isinstance(source, bytes | bytearray):
        return bytes(source[:12]).startswith(RASTER_MAGIC)
    if isinstance(source, str):
        return source.split("?", 1)[0].lower().endswith(RASTER_EXTENSIONS)
    return False


@dataclass
class SceneRow:
    """One output row of a scene: the image for the model (None for error and empty rows),
    its size, an error, and the georeferenced columns (`pipeline.geo`)."""

    image: np.ndarray | None
    size: tuple[int | None, int | None] = (None, None)
    error: BaseException | None = None
    stage: str | None = None
    columns: dict = field(default_factory=dict)


@contextlib.contextmanager
def open_scene(source):
    """The rasterio dataset of a URI, a local path or raster bytes (header read only)."""
    import rasterio
    from rasterio.io import MemoryFile

    with rasterio.Env(**GDAL_OPTIONS):
        if isinstance(source, bytes | bytearray):
            with MemoryFile(bytes(source)) as mem, mem.open() as ds:
                yield ds
            return
        fs, path = open_fs(source)
        if is_local(fs):
            ds = rasterio.open(path)
        else:
            ds = retrying(f"open {source}", lambda: rasterio.open(path, opener=_opener(fs)))
        with ds:
            yield ds


def _opener(fs):
    def opener(path: str, mode: str = "rb"):
        try:
            return fs.open(path, mode, block_size=REMOTE_BLOCK, cache_type="first")
        except ValueError as exc:  # s3fs on a name that is no key (rasterio probes one)
            raise FileNotFoundError(path) from exc

    return opener


def select_bands(ds, bands: tuple[int, ...] | None) -> list[int]:
    """The bands to show as R, G, B (or one grey band)."""
    from rasterio.enums import ColorInterp

    if bands is not None:
        if max(bands) > ds.count:
            raise ValueError(f"--bands {','.join(map(str, bands))}: the scene has {ds.count} "
                             f"band(s)")
        return list(bands)
    interp = list(ds.colorinterp)
    wanted = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    if all(c in interp for c in wanted):
        return [interp.index(c) + 1 for c in wanted]
    return [1, 2, 3] if ds.count >= 3 else [1]


def _shrunk(width: int, height: int, side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def band_limits(ds, bands: list[int], stretch: tuple[float, float]) -> np.ndarray | None:
    """Per-band (low, high) of the stretch, [n, 2], from one overview read of the valid
    pixels; None for 8-bit data (shown as it is). The overview is read for 8-bit data too:
    a scene whose data cannot be read at all (a truncated file) fails here, as one row."""
    from rasterio.enums import Resampling

    w, h = _shrunk(ds.width, ds.height, STATS_SIDE)
    data = ds.read(bands, out_shape=(len(bands), h, w), resampling=Resampling.nearest)
    if all(ds.dtypes[b - 1] == "uint8" for b in bands):
        return None
    valid = ds.dataset_mask(out_shape=(h, w), resampling=Resampling.nearest) > 0
    limits = np.zeros((len(bands), 2), np.float64)
    for i in range(len(bands)):
        values = data[i][valid].astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            limits[i] = np.percentile(values, stretch)
    return limits


def to_rgb8(data: np.ndarray, valid: np.ndarray, limits: np.ndarray | None,
            pad: tuple[int, int, int]) -> np.ndarray:
    """[bands, h, w] raster values -> uint8 [h, w, 3]: stretched per band between `limits`
    (as they are for 8-bit data), invalid pixels painted with `pad`."""
    if limits is None:
        out = data.astype(np.uint8)
    else:
        lo, hi = limits[:, 0, None, None], limits[:, 1, None, None]
        span = np.where(hi > lo, hi - lo, 1.0)
        out = np.nan_to_num((data.astype(np.float64) - lo) * (255.0 / span))
        out = np.rint(out.clip(0, 255)).astype(np.uint8)
    rgb = np.repeat(out, 3, axis=0) if out.shape[0] == 1 else out
    rgb = np.ascontiguousarray(np.moveaxis(rgb, 0, -1))
    rgb[~valid] = pad
    return rgb


def grid(width: int, height: int, size: float, stride: float) -> list[tuple[int, int, tuple]]:
    """(row, col, (x, y, w, h)) of every chip window over a width x height scene: offsets
    round(i * stride), each window `size` wide (rounded) and cut at the scene's edge; enough
    chips that the last one reaches the edge."""
    def offsets(extent: int) -> list[int]:
        n = 1 if extent <= size else math.ceil((extent - size) / stride) + 1
        return [round(i * stride) for i in range(n)]

    cells = []
    side = round(size)
    for r, y in enumerate(offsets(height)):
        for c, x in enumerate(offsets(width)):
            cells.append((r, c, (x, y, min(side, width - x), min(side, height - y))))
    return cells


def native_scale(ds, config: RasterConfig) -> float:
    """Native pixels per model pixel: gsd / resolution (1 without --gsd, and for a scene
    without georeferencing, which chips at its own pixels)."""
    from pipeline.geo import is_georeferenced

    if config.gsd is None:
        return 1.0
    if not is_georeferenced(ds.crs, ds.transform):
        logger.warning("--gsd: %s has no georeferencing; chipped at its own pixels", ds.name)
        return 1.0
    if ds.crs.is_geographic:
        raise ValueError(f"--gsd is in metres, and this scene's CRS ({ds.crs}) is in degrees")
    return config.gsd / math.sqrt(abs(ds.transform.determinant))


def scene_rows(source, config: RasterConfig, image_size: int,
               pad: tuple[int, int, int]) -> Iterator[SceneRow]:
    """The rows of one scene (see the module's docstring): its chips, or the whole scene."""
    if not isinstance(source, bytes | bytearray):
        fs, path = open_fs(source)
        try:
            retrying(f"stat {source}", lambda: fs.info(path))
        except Exception as exc:  # noqa: BLE001 - a missing or unreadable object: a read error
            yield SceneRow(None, error=exc, stage="read")
            return
    with contextlib.ExitStack() as stack:
        try:
            ds = stack.enter_context(open_scene(source))
            bands = select_bands(ds, config.bands)
            limits = band_limits(ds, bands, config.stretch)
            scale = native_scale(ds, config)
        except Exception as exc:  # noqa: BLE001 - GDAL refuses the file: one error row
            yield SceneRow(None, error=exc, stage="decode")
            return
        scene = Scene(ds, bands, limits, pad)
        if not config.chipped:
            yield scene.whole(image_size)
            return
        size = config.chip_size * scale
        stride = (config.chip_size - config.chip_overlap) * scale
        for row, col, box in grid(ds.width, ds.height, size, stride):
            yield scene.chip(row, col, box, scale, config.chip_size, image_size)


@dataclass
class Scene:
    """An open scene with its bands and stretch: reads windows as the model's uint8 RGB."""

    ds: object
    bands: list[int]
    limits: np.ndarray | None
    pad: tuple[int, int, int]

    def read(self, window, out_w: int, out_h: int) -> np.ndarray | None:
        """uint8 [out_h, out_w, 3] of a window, None when it holds no valid pixel."""
        from rasterio.enums import Resampling

        shrink = out_w < window.width
        valid = self.ds.dataset_mask(window=window, out_shape=(out_h, out_w),
                                     resampling=Resampling.nearest) > 0
        if not valid.any():
            return None
        data = self.ds.read(self.bands, window=window,
                            out_shape=(len(self.bands), out_h, out_w),
                            resampling=Resampling.average if shrink else Resampling.bilinear)
        return to_rgb8(data, valid, self.limits, self.pad)

    def columns(self, window, row=None, col=None) -> dict:
        cols = window_columns(window, self.ds.transform, self.ds.crs)
        cols.update(chip_row=row, chip_col=col)
        return cols

    def whole(self, image_size: int) -> SceneRow:
        """The scene shrunk to at most `image_size` on its long side (from an overview)."""
        from rasterio.windows import Window

        ds = self.ds
        window = Window(0, 0, ds.width, ds.height)
        cols = self.columns(window)
        out_w, out_h = _shrunk(ds.width, ds.height, image_size)
        try:
            rgb = self.read(window, out_w, out_h)
        except Exception as exc:  # noqa: BLE001 - the scene's error row
            return SceneRow(None, error=exc, stage="decode", columns=cols)
        cols["empty"] = rgb is None
        if rgb is None:
            return SceneRow(None, (ds.width, ds.height), columns=cols)
        return SceneRow(fit(rgb, image_size, self.pad), (ds.width, ds.height), columns=cols)

    def chip(self, row: int, col: int, box: tuple, scale: float, chip_size: int,
             image_size: int) -> SceneRow:
        """One chip: its window read at chip scale, padded right and bottom to chip_size."""
        from rasterio.windows import Window

        window = Window(*box)
        cols = self.columns(window, row, col)
        out_w = min(chip_size, max(1, round(box[2] / scale)))
        out_h = min(chip_size, max(1, round(box[3] / scale)))
        try:
            rgb = self.read(window, out_w, out_h)
        except Exception as exc:  # noqa: BLE001 - this chip's error row; the others go on
            return SceneRow(None, error=exc, stage="decode", columns=cols)
        cols["empty"] = rgb is None
        if rgb is None:
            return SceneRow(None, (chip_size, chip_size), columns=cols)
        canvas = np.empty((chip_size, chip_size, 3), np.uint8)
        canvas[:] = self.pad
        canvas[:out_h, :out_w] = rgb
        return SceneRow(fit(canvas, image_size, self.pad), (chip_size, chip_size),
                        columns=cols)


def fit(rgb: np.ndarray, image_size: int, pad: tuple[int, int, int]) -> np.ndarray:
    """The model's square: as it is when already image_size square, else padded centred and
    resized (`flexattn.padding.square_resize`, as for every image)."""
    from PIL import Image

    from flexattn.padding import square_resize

    if rgb.shape[:2] == (image_size, image_size):
        return rgb
    return np.asarray(square_resize(Image.fromarray(rgb), image_size, pad), dtype=np.uint8)


def full_window_columns(width: int, height: int) -> dict:
    """The columns of an image taken whole through Pillow: its window, null geography."""
    from rasterio.windows import Window

    cols = window_columns(Window(0, 0, width, height))
    cols.update(chip_row=None, chip_col=None, empty=False)
    return cols


def image_chips(rgb: np.ndarray, config: RasterConfig, image_size: int,
                pad: tuple[int, int, int]) -> Iterator[SceneRow]:
    """Chips of an already decoded, non-georeferenced image (JPEG, PNG): the same grid at its
    own pixels, null geography."""
    from rasterio.windows import Window

    height, width = rgb.shape[:2]
    size = config.chip_size
    for row, col, (x, y, w, h) in grid(width, height, size, size - config.chip_overlap):
        canvas = np.empty((size, size, 3), np.uint8)
        canvas[:] = pad
        canvas[:h, :w] = rgb[y:y + h, x:x + w]
        cols = window_columns(Window(x, y, w, h))
        cols.update(chip_row=row, chip_col=col, empty=False)
        yield SceneRow(fit(canvas, image_size, pad), (size, size), columns=cols)
