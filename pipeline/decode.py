"""Stage 2, decode (CPU tasks): fetch bytes, decode, orient, convert to RGB, pad and resize.

Per row: bytes from `source_uri` -> PIL image -> EXIF orientation -> RGB -> square of side
max(w, h) filled with the CLIP mean colour (122, 116, 104), the image pasted at
((S - w) // 2, (S - h) // 2) -> bicubic resize to `image_size` (1008 for LLaVA-FlexAttn).
Adds `image` (uint8 [S, S, 3]), `width`, `height` (original, after orientation), `error`,
`error_stage`.

The image comes from the row's `image` when it has one (`pipeline.processor`'s input): encoded
bytes, a path or URI to read, or an already decoded array (only padded and resized); else it is
read from `source_uri`. The output's `image` replaces the input's.

A file that cannot be read or decoded becomes a row with `error` set (stage `read` or
`decode`) and a blank image; the job goes on. Images above `max_pixels` are refused from their
header, before any pixel is decoded, so a decompression bomb is an error row, not an OOM.

With a `raster` config (`pipeline.raster.RasterConfig`), GeoTIFF / COG / JPEG2000 scenes are
read through rasterio instead, windowed: bands, per-band stretch, nodata as the pad colour,
and with `chip_size` one row per chip (`decode_stream` hands them on in tables of
`rows_per_output` rows); every row then carries the georeferenced columns of `pipeline.geo`
(`chip_row`, `chip_col`, `window`, `crs`, `geometry`, `bbox_lonlat`, `empty`). Other images
keep the Pillow path (and are chipped the same way, with null geography).

`expand` is the hook for inputs that yield several images (TIFF pages, PDF pages): a function
`(data, source_uri, config) -> iterable of (page, PIL image)`; each gives a row with `page` set.
A page given as an exception instead of an image (or that fails to prepare) becomes an error
row for that page, and the document's other pages still decode.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import ExifTags, Image, ImageOps, ImageSequence, UnidentifiedImageError
from ray.data.extensions import ArrowTensorArray

from flexattn.options import DEFAULT_HIGHRES_SIZE, PAD_COLOUR
from flexattn.padding import square_resize
from pipeline.columns import IMAGE, format_error, require_columns
from pipeline.geo import GEO_FIELDS
from pipeline.raster import RasterConfig
from pipeline.storage import read_bytes

logger = logging.getLogger(__name__)

STAGE = "decode"
NO_IMAGE_ERROR = "ValueError: the row has no image (its image is null)"
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb error threshold
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*")

Expand = Callable[[bytes, str, "DecodeConfig"], Iterable[tuple[int, Image.Image | Exception]]]


@dataclass(frozen=True)
class DecodeConfig:
    image_size: int = DEFAULT_HIGHRES_SIZE  # the model's config.highres_size
    max_pixels: int = DEFAULT_MAX_PIXELS
    pad_color: tuple[int, int, int] = PAD_COLOUR
    expand: Expand | None = None  # one input -> several rows (adds a `page` column)
    # GeoTIFF / COG / JPEG2000 through rasterio, chips, and the georeferenced columns
    # (`pipeline.raster`, `pipeline.geo`); None: every file through Pillow, as before.
    raster: RasterConfig | None = None
    rows_per_output: int = 8  # rows per table a decode task hands on (--decode-rows-per-task)

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"--image-size must be positive, got {self.image_size}")
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be positive, got {self.max_pixels}")
        if self.rows_per_output < 1:
            raise ValueError(f"rows_per_output must be positive, got {self.rows_per_output}")


class ImageTooLargeError(ValueError):
    pass


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Let our `max_pixels` check, not Pillow's global, decide (restored afterwards)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} (--max-pixels)"
        )


def _stretch(arr: np.ndarray) -> np.ndarray:
    """Linear min-max stretch of any numeric array to uint8 (16-bit and float imagery)."""
    if arr.dtype == np.uint8:
        return arr
    values = arr.astype(np.float32)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    if not hi > lo:
        return np.zeros(arr.shape, np.uint8)
    return np.nan_to_num((values - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = PAD_COLOUR) -> Image.Image:
    """Any Pillow mode to RGB. Alpha is composited over `background`; high-bit-depth and float
    images are min-max stretched to 8 bits (Pillow's own conversion would clip them). An RGB
    image comes back as is, not copied."""
    if img.mode in HIGH_BIT_MODES:
        return Image.fromarray(_stretch(np.asarray(img))).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        canvas = Image.new("RGB", img.size, background)
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy RGB too


def _open_tiff_with_tifffile(data: bytes, max_pixels: int) -> Image.Image:
    """Multi-band / unusual TIFFs (GeoTIFF RGBN, 16-bit RGB) that Pillow cannot open."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        check_pixels((page.imagewidth, page.imagelength), max_pixels)
        arr = page.asarray()
    if arr.ndim == 3 and arr.shape[0] < arr.shape[-1] and arr.shape[0] <= 16:
        arr = np.moveaxis(arr, 0, -1)  # planar [C, H, W] -> [H, W, C]
    if arr.ndim == 3:
        arr = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., 0]
    return Image.fromarray(_stretch(arr))


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open, size-check from the header, then decode the first frame."""
    try:
        img = Image.open(io.BytesIO(data))
        check_pixels(img.size, max_pixels)
        img.load()
        return img
    except ImageTooLargeError:
        raise
    except Exception as exc:
        if data[:4] in TIFF_MAGIC:
            return _open_tiff_with_tifffile(data, max_pixels)
        if isinstance(exc, UnidentifiedImageError):  # Pillow's message names only a BytesIO
            raise UnidentifiedImageError(describe_unreadable(data)) from None
        raise


# Leading bytes of formats a mislabelled or damaged file commonly turns out to be.
SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"%PDF-", "PDF"),
    (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "gzip"),
)


def describe_unreadable(data: bytes) -> str:
    """Why no image decoder accepts `data`, from its first bytes: empty, text (an HTML error
    page saved under an image name), or a damaged file of a known format."""
    if not data:
        return "empty file (0 bytes)"
    if data[:64].lstrip().startswith(b"<"):  # <!DOCTYPE html>, <html>, <?xml ...>
        return f"not an image: the file is HTML/XML text ({len(data)} bytes)"
    kind = next((name for magic, name in SIGNATURES if data.startswith(magic)), None)
    if kind is not None:
        return f"damaged {kind} data ({len(data)} bytes): no image decoder accepts it"
    return f"not a known image format ({len(data)} bytes, starting {data[:8]!r})"


def prepare(img: Image.Image, config: DecodeConfig) -> tuple[np.ndarray, int, int]:
    """Orient, convert, pad, resize: (uint8 [S, S, 3], original width, original height)."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # else exif_transpose copies
        img = ImageOps.exif_transpose(img)
    width, height = img.size
    rgb = to_rgb(img, config.pad_color)
    square = square_resize(rgb, config.image_size, config.pad_color)
    return np.asarray(square, dtype=np.uint8), width, height


def expand_frames(data: bytes, uri: str, config: DecodeConfig) -> Iterator[tuple[int, Image.Image]]:
    """An `expand` hook: every frame of a multi-frame image (multi-page TIFF, animated GIF)."""
    img = Image.open(io.BytesIO(data))
    for page, frame in enumerate(ImageSequence.Iterator(img)):
        check_pixels(frame.size, config.max_pixels)
        yield page, frame.copy()


def _sources(batch: pa.Table) -> list:
    """Per row: a URI (str), encoded bytes, a decoded array, or None."""
    if IMAGE not in batch.column_names:
        require_columns(STAGE, batch, ("source_uri",))
        return batch.column("source_uri").to_pylist()
    column = batch.column(IMAGE)
    if isinstance(column.type, pa.ExtensionType):  # Ray's tensor columns: decoded arrays
        valid = column.is_valid().to_pylist()
        arrays = [a for chunk in column.chunks for a in chunk.to_numpy(zero_copy_only=False)]
        return [a if ok else None for a, ok in zip(arrays, valid)]
    return column.to_pylist()


def _from_array(arr: np.ndarray, config: DecodeConfig) -> tuple[np.ndarray, int, int]:
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"a decoded image must be H x W, H x W x 3 or H x W x 4, got shape "
                         f"{arr.shape}")
    check_pixels((arr.shape[1], arr.shape[0]), config.max_pixels)
    return prepare(Image.fromarray(_stretch(arr)), config)


class _Rows:
    """The output rows of a decode batch, as they are made (`decode_stream` hands them on)."""

    def __init__(self, config: DecodeConfig):
        self.config = config
        self.blank = np.zeros((config.image_size, config.image_size, 3), np.uint8)
        self.take: list[int] = []
        self.values: dict[str, list] = {k: [] for k in ("image", "width", "height", "error",
                                                          "error_stage", "page", "geo")}
        self.errors = 0

    def __len__(self) -> int:
        return len(self.take)

    def emit(self, row: int, image=None, size=(None, None), error=None, stage=None, page=None,
             geo=None) -> None:
        self.take.append(row)
        for name, value in (("image", self.blank if image is None else image),
                            ("width", size[0]), ("height", size[1]), ("error", error),
                            ("error_stage", stage), ("page", page), ("geo", geo or {})):
            self.values[name].append(value)
        self.errors += error is not None

    def emit_scene(self, row: int, scene) -> None:
        """A `pipeline.raster.SceneRow`."""
        error = None if scene.error is None else format_error(scene.error)
        self.emit(row, scene.image, scene.size, error, scene.stage, geo=scene.columns)

    def table(self, batch: pa.Table) -> pa.Table:
        """The rows made so far as a table (then forgotten)."""
        v = self.values
        out = batch.take(pa.array(self.take, pa.int64()))
        if IMAGE in out.column_names:  # (after take: a table without columns has no rows)
            out = out.drop_columns([IMAGE])
        stacked = np.stack(v["image"]) if v["image"] else np.zeros((0, *self.blank.shape),
                                                                   np.uint8)
        out = out.append_column(IMAGE, ArrowTensorArray.from_numpy(stacked))
        out = out.append_column("width", pa.array(v["width"], pa.int32()))
        out = out.append_column("height", pa.array(v["height"], pa.int32()))
        out = out.append_column("error", pa.array(v["error"], pa.string()))
        out = out.append_column("error_stage", pa.array(v["error_stage"], pa.string()))
        if self.config.expand is not None:
            out = out.append_column("page", pa.array(v["page"], pa.int32()))
        if self.config.raster is not None:
            out = out.drop_columns([f.name for f in GEO_FIELDS if f.name in out.column_names])
            for f in GEO_FIELDS:
                out = out.append_column(f, pa.array([g.get(f.name) for g in v["geo"]], f.type))
        self.take = []
        self.values = {k: [] for k in self.values}
        return out


def _raster_source(source, config: DecodeConfig) -> bool:
    from pipeline.raster import handles

    return config.raster is not None and config.expand is None and handles(source)


def decode_stream(batch: pa.Table, config: DecodeConfig) -> Iterator[pa.Table]:
    """Ray Data task UDF (`batch_format="pyarrow"`) that hands its rows on in tables of at
    most `config.rows_per_output` rows (one input can give many chips): one row per input,
    per page with `expand`, per chip with `raster.chip_size`."""
    from pipeline.raster import scene_rows

    start = time.perf_counter()
    sources = _sources(batch)
    uris = (batch.column("source_uri").to_pylist() if "source_uri" in batch.column_names
            else [s if isinstance(s, str) else "<bytes>" for s in sources])
    rows, handed = _Rows(config), 0
    with _own_pixel_limit():
        for row, (source, uri) in enumerate(zip(sources, uris)):
            if source is not None and _raster_source(source, config):
                for scene in scene_rows(source, config.raster, config.image_size,
                                        config.pad_color):
                    rows.emit_scene(row, scene)
                    if len(rows) >= config.rows_per_output:
                        handed += len(rows)
                        yield rows.table(batch)
                continue
            _decode_one(rows, row, source, uri, config)
            if len(rows) >= config.rows_per_output:
                handed += len(rows)
                yield rows.table(batch)
    if len(rows) or not handed:
        handed += len(rows)
        yield rows.table(batch)
    logger.info("decode: %d inputs -> %d rows (%d errors) in %.2fs",
                batch.num_rows, handed, rows.errors, time.perf_counter() - start)


def decode_batch(batch: pa.Table, config: DecodeConfig) -> pa.Table:
    """Ray Data task UDF (`batch_format="pyarrow"`): one row per input (per page if `expand`,
    per chip with `raster.chip_size`), as one table."""
    tables = list(decode_stream(batch, config))
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def _prepare_rows(rows: _Rows, row: int, img: Image.Image, config: DecodeConfig,
                  page=None) -> None:
    """One decoded Pillow image: one row, or its chips (`raster.chip_size`)."""
    raster = config.raster
    if raster is None or not raster.chipped:
        image, width, height = prepare(img, config)
        geo = None
        if raster is not None:
            from pipeline.raster import full_window_columns

            geo = full_window_columns(width, height)
        rows.emit(row, image, (width, height), page=page, geo=geo)
        return
    from pipeline.raster import image_chips

    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        img = ImageOps.exif_transpose(img)
    rgb = np.asarray(to_rgb(img, config.pad_color), dtype=np.uint8)
    for chip in image_chips(rgb, raster, config.image_size, config.pad_color):
        rows.emit_scene(row, chip)


def _decode_one(rows: _Rows, row: int, source, uri: str, config: DecodeConfig) -> None:
    """The rows of one input that is not a raster scene."""
    page0 = None if config.expand is None else 0
    if source is None:
        rows.emit(row, error=NO_IMAGE_ERROR, stage="read")
        return
    if isinstance(source, np.ndarray):
        try:
            image, width, height = _from_array(source, config)
        except Exception as exc:  # noqa: BLE001 - any failure is this row's error
            rows.emit(row, error=format_error(exc), stage=STAGE, page=page0)
            return
        rows.emit(row, image, (width, height), page=page0)
        return
    try:
        data = source if isinstance(source, bytes) else read_bytes(source)
    except Exception as exc:  # noqa: BLE001 - any failure is this row's error
        rows.emit(row, error=format_error(exc), stage="read")
        return
    try:
        if config.expand is None:
            _prepare_rows(rows, row, open_image(data, config.max_pixels), config)
            return
        n_before = len(rows)
        for page, frame in config.expand(data, uri, config):
            try:
                if isinstance(frame, Exception):
                    raise frame
                image, width, height = prepare(frame, config)
            except Exception as exc:  # noqa: BLE001 - this page's error row
                rows.emit(row, error=format_error(exc), stage=STAGE, page=page)
                continue
            rows.emit(row, image, (width, height), page=page)
        if len(rows) == n_before:
            raise ValueError("document has no pages")
    except Exception as exc:  # noqa: BLE001 - any failure is this row's error
        rows.emit(row, error=format_error(exc), stage=STAGE)
