"""`--save-scene-maps N`: where in a large scene the model looked, one PNG per scene.

Runs on the driver after the job, for the first N chipped scenes (by id) of the output: the
scene read again from an overview (long side `MAP_SIDE`, with the job's bands and per-band
stretch, nodata in the pad colour), every chip's window outlined (white; red for an error
row; empty chips dimmed), and the high-res cells each chip's answer used (`hr_cells`, the
9x9 grid over the chip as the model saw it, `flexattn.viz.cell_box`) filled in green. Files
go to `<output>/_scenes/<id>.png` (names as `pipeline.overlays.overlay_name`), ignored by
Parquet readers thanks to the `_`. A scene that cannot be drawn is skipped with a warning.
"""

from __future__ import annotations

import io
import logging
import posixpath

import pyarrow.compute as pc

from flexattn.options import PAD_COLOUR
from pipeline.overlays import overlay_name
from pipeline.raster import RasterConfig, Scene, band_limits, native_scale, open_scene, select_bands
from pipeline.resume import read_output
from pipeline.storage import open_fs, to_uri, write_bytes

logger = logging.getLogger(__name__)

SCENE_DIR = "_scenes"
MAP_SIDE = 1024
COLUMNS = ["id", "source_uri", "chip_row", "chip_col", "window", "hr_cells", "empty", "error"]
CELL_FILL = (0, 255, 0, 90)
CELL_EDGE = (0, 255, 0, 255)
GRID_EDGE = (255, 255, 255, 255)
ERROR_EDGE = (255, 0, 0, 255)
EMPTY_FILL = (0, 0, 0, 110)


def save_scene_maps(output: str, n: int, config: RasterConfig | None) -> list[str]:
    """Draw the first `n` chipped scenes under `output`/_scenes; returns the files' URIs."""
    if n < 1 or config is None or not config.chipped:
        return []
    table = read_output(output, columns=COLUMNS)
    if not table.num_rows:
        return []
    table = table.filter(pc.invert(pc.is_null(table.column("chip_row"))))
    ids = sorted(set(table.column("id").to_pylist()))[:n]
    fs, root = open_fs(output)
    written = []
    for scene_id in ids:
        rows = table.filter(pc.equal(table.column("id"), scene_id)).to_pylist()
        try:
            png = draw_scene_map(rows[0]["source_uri"], rows, config)
        except Exception as exc:  # noqa: BLE001 - one scene that cannot be drawn is skipped
            logger.warning("scene map for %s skipped: %s", scene_id, exc)
            continue
        uri = to_uri(fs, posixpath.join(root, SCENE_DIR, overlay_name(scene_id)))
        write_bytes(uri, png)
        written.append(uri)
    logger.info("wrote %d scene map(s) under %s", len(written),
                to_uri(fs, posixpath.join(root, SCENE_DIR)))
    return written


def draw_scene_map(uri: str, rows: list[dict], config: RasterConfig) -> bytes:
    """The PNG of one scene with its chips (`rows`: the scene's output rows)."""
    from PIL import Image
    from rasterio.windows import Window

    with open_scene(uri) as ds:
        bands = select_bands(ds, config.bands)
        scene = Scene(ds, bands, band_limits(ds, bands, config.stretch), PAD_COLOUR)
        side = max(ds.width, ds.height)
        out_w = max(1, round(ds.width * MAP_SIDE / side))
        out_h = max(1, round(ds.height * MAP_SIDE / side))
        rgb = scene.read(Window(0, 0, ds.width, ds.height), out_w, out_h)
        native_chip = config.chip_size * native_scale(ds, config)
        scale = out_w / ds.width
    base = (Image.new("RGB", (out_w, out_h), PAD_COLOUR) if rgb is None
            else Image.fromarray(rgb))
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    _draw_chips(layer, rows, native_chip, scale)
    picture = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def _draw_chips(layer, rows: list[dict], native_chip: float, scale: float) -> None:
    from PIL import ImageDraw

    from flexattn.viz import cell_box

    draw = ImageDraw.Draw(layer)
    for row in rows:
        w = row["window"]
        if w is None:
            continue
        x0, y0 = w["x"] * scale, w["y"] * scale
        x1, y1 = (w["x"] + w["width"]) * scale, (w["y"] + w["height"]) * scale
        if row["empty"]:
            draw.rectangle([x0, y0, x1, y1], fill=EMPTY_FILL)
        cells = row["hr_cells"] or []
        chip_px = max(1, round(native_chip))
        for index, used in enumerate(cells):
            if not used:
                continue
            cx0, cy0, cx1, cy1 = cell_box(index // 9, index % 9, chip_px, chip_px,
                                          scale=scale)
            box = [x0 + cx0, y0 + cy0, min(x0 + cx1, x1) - 1, min(y0 + cy1, y1) - 1]
            if box[2] > box[0] and box[3] > box[1]:
                draw.rectangle(box, fill=CELL_FILL, outline=CELL_EDGE)
        edge = ERROR_EDGE if row["error"] is not None else GRID_EDGE
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=edge, width=2)
