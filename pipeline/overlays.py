"""`--save-overlays N`: PNGs of what the model looked at, for the first N answered rows.

Runs on the driver after the job: reads `id`, `source_uri`, `hr_cells`, `selection_map`
(when the task writes it) and `page` from the written Parquet, fetches each row's image again
(re-rendering its page for documents, through the task's `expand` hook), and draws it with
`flexattn.viz.draw_overlay`: the 9x9 cells in `hr_cells` outlined, the others dimmed, and the
last selection map as a heat map. Needs Pillow and matplotlib, not the model. Files go to
`<output>/_overlays/<id>[_p<page>].png` (characters other than letters, digits, `.`, `-`
become `_`), beside the Parquet files but ignored by Parquet readers thanks to the `_`.
"""

from __future__ import annotations

import io
import logging
import posixpath
import re

import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from pipeline.decode import DecodeConfig, Expand, _own_pixel_limit, open_image, to_rgb
from pipeline.resume import list_output_files, read_output
from pipeline.storage import open_fs, read_bytes, to_uri, write_bytes

logger = logging.getLogger(__name__)

OVERLAY_DIR = "_overlays"
COLUMNS = ("id", "source_uri", "page", "width", "height", "hr_cells", "selection_map", "error")


def overlay_name(row_id: str, page: int | None = None) -> str:
    stem = re.sub(r"[^A-Za-z0-9.\-]", "_", row_id)
    return f"{stem}_p{page}.png" if page is not None else f"{stem}.png"


def load_image(uri: str, page: int | None = None, expand: Expand | None = None,
               config: DecodeConfig | None = None) -> Image.Image:
    """The RGB image (or page) of an input as decode gave it to the model, before padding."""
    config = config or DecodeConfig()
    data = read_bytes(uri)
    with _own_pixel_limit():
        if expand is None:
            img = open_image(data, config.max_pixels)
        else:
            img = next((f for p, f in expand(data, uri, config) if p == page), None)
            if img is None or isinstance(img, Exception):
                raise ValueError(f"{uri}: page {page} cannot be read again ({img})")
        return to_rgb(ImageOps.exif_transpose(img))


def _columns(output: str) -> list[str]:
    files = list_output_files(output)
    if not files:
        return []
    fs, path = open_fs(files[0])
    with fs.open(path, "rb") as f:
        names = pq.read_schema(f).names
    return [c for c in COLUMNS if c in names]


def save_overlays(output: str, n: int, expand: Expand | None = None,
                  config: DecodeConfig | None = None) -> list[str]:
    """Draw the first `n` rows without error (by id, then page) under `output`/_overlays."""
    from flexattn.viz import save_overlay

    if n < 1:
        return []
    columns = _columns(output)
    if not columns:
        return []
    table = read_output(output, columns=columns)
    table = table.filter(pc.is_null(table.column("error")))
    table = table.filter(pc.invert(pc.is_null(table.column("hr_cells"))))
    keys = [("id", "ascending")] + ([("page", "ascending")] if "page" in columns else [])
    rows = table.sort_by(keys).slice(0, n).to_pylist()
    fs, root = open_fs(output)
    written = []
    for row in rows:
        page = row.get("page")
        try:
            image = load_image(row["source_uri"], page, expand, config)
            if image.size != (row["width"], row["height"]):
                raise ValueError(f"image is {image.size[0]}x{image.size[1]}, the row says "
                                 f"{row['width']}x{row['height']}")
            buf = io.BytesIO()
            save_overlay(buf, image, row["hr_cells"], row.get("selection_map"))
        except Exception as exc:  # noqa: BLE001 - one bad overlay must not fail the job
            logger.warning("overlay for %s (page %s) skipped: %s", row["id"], page, exc)
            continue
        uri = to_uri(fs, posixpath.join(root, OVERLAY_DIR, overlay_name(row["id"], page)))
        write_bytes(uri, buf.getvalue())
        written.append(uri)
    logger.info("wrote %d overlay(s) under %s", len(written),
                to_uri(fs, posixpath.join(root, OVERLAY_DIR)))
    return written
