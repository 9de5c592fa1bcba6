"""Georeferenced output columns and the GeoParquet 1.1 metadata of the written files.

Every row of a raster job carries (docs/DESIGN.md section 8):
- `chip_row`, `chip_col` (int32; null when the scene is one row, not chipped);
- `window`: the scene pixels read, struct of int32 `x`, `y`, `width`, `height` (native pixels,
  before any `--gsd` resampling);
- `crs`: `EPSG:nnnn` where the CRS has an EPSG code, else its WKT;
- `geometry`: the window's footprint in the scene's CRS as WKB: the four corners of the window
  put through `rasterio.windows.transform` (a dataset's `window_transform`), so exactly the area the model saw, rotated
  and sheared geotransforms included (shapely);
- `bbox_lonlat`: that footprint's bounds in EPSG:4326, struct of float64 `xmin`, `ymin`,
  `xmax`, `ymax`, the edges densified so that a curved edge's extreme is kept (pyproj);
- `empty`: the window holds only nodata (masked) pixels; such a row is not sent to the model
  and is not an error.

Non-georeferenced images (no CRS, or the identity transform GDAL reports for a plain TIFF,
PNG or JPEG) get a `window` and null geography.

`geoparquet_metadata(table)` gives a file's `geo` schema metadata (GeoParquet 1.1.0, WKB
encoding): the CRS as PROJJSON when every georeferenced row of the file shares one CRS, else
`null` (unknown; the `crs` column then says per row), and the file's bbox in that CRS.
"""

from __future__ import annotations

import functools
import json
import logging

import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

GEOPARQUET_VERSION = "1.1.0"
WINDOW_TYPE = pa.struct([("x", pa.int32()), ("y", pa.int32()), ("width", pa.int32()),
                         ("height", pa.int32())])
BBOX_TYPE = pa.struct([("xmin", pa.float64()), ("ymin", pa.float64()), ("xmax", pa.float64()),
                       ("ymax", pa.float64())])
GEO_FIELDS = (
    pa.field("chip_row", pa.int32()),
    pa.field("chip_col", pa.int32()),
    pa.field("window", WINDOW_TYPE),
    pa.field("crs", pa.string()),
    pa.field("geometry", pa.binary()),
    pa.field("bbox_lonlat", BBOX_TYPE),
    pa.field("empty", pa.bool_()),
)
GEO_COLUMNS = tuple(f.name for f in GEO_FIELDS)
CHIP_KEYS = ("id", "chip_row", "chip_col")
DENSIFY_POINTS = 21  # points per edge when the box is projected to lon/lat


def is_georeferenced(crs, transform) -> bool:
    """A CRS and a geotransform other than GDAL's identity default."""
    from affine import Affine

    return crs is not None and transform is not None and transform != Affine.identity()


@functools.lru_cache(maxsize=64)
def crs_name(crs_wkt: str) -> str:
    """`EPSG:nnnn` where the CRS has an EPSG code, else its WKT."""
    from pyproj import CRS

    crs = CRS.from_wkt(crs_wkt)
    code = crs.to_epsg()
    return f"EPSG:{code}" if code is not None else crs.to_wkt()


@functools.lru_cache(maxsize=64)
def _to_lonlat(crs_wkt: str):
    from pyproj import Transformer

    return Transformer.from_crs(crs_wkt, "EPSG:4326", always_xy=True)


def window_columns(window, transform=None, crs=None) -> dict:
    """The georeferenced columns of one window of a scene (see the module's docstring)."""
    import shapely
    from rasterio.windows import transform as window_transform

    cols = {"window": {"x": int(window.col_off), "y": int(window.row_off),
                       "width": int(window.width), "height": int(window.height)},
            "crs": None, "geometry": None, "bbox_lonlat": None}
    if not is_georeferenced(crs, transform):
        return cols
    local = window_transform(window, transform)
    w, h = window.width, window.height
    corners = [local @ (0, 0), local @ (w, 0), local @ (w, h), local @ (0, h)]
    polygon = shapely.Polygon(corners)
    wkt = crs.to_wkt()
    xmin, ymin, xmax, ymax = _to_lonlat(wkt).transform_bounds(
        *polygon.bounds, densify_pts=DENSIFY_POINTS)
    cols.update(crs=crs_name(wkt), geometry=shapely.to_wkb(polygon),
                bbox_lonlat={"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax})
    return cols


def footprint(wkb: bytes):
    """The shapely polygon of a `geometry` value."""
    import shapely

    return shapely.from_wkb(wkb)


@functools.lru_cache(maxsize=64)
def _projjson(name: str) -> dict:
    from pyproj import CRS

    return CRS.from_user_input(name).to_json_dict()


def geoparquet_metadata(table: pa.Table) -> dict[bytes, bytes]:
    """The `geo` schema metadata of one output file (empty when it has no `geometry`)."""
    if "geometry" not in table.column_names:
        return {}
    crs_values = (table.column("crs").drop_null().unique().to_pylist()
                  if "crs" in table.column_names else [])
    column: dict = {"encoding": "WKB", "geometry_types": ["Polygon"]}
    if len(crs_values) == 1:
        column["crs"] = _projjson(crs_values[0])
        bbox = _bbox(table.column("geometry"))
        if bbox is not None:
            column["bbox"] = bbox
    else:  # none (no georeferenced row) or several CRSs: unknown; the `crs` column says
        column["crs"] = None
        if len(crs_values) > 1:
            logger.warning("an output file holds footprints in %d CRSs (%s): its GeoParquet "
                           "crs is null; read the `crs` column per row", len(crs_values),
                           ", ".join(sorted(crs_values))[:200])
    geo = {"version": GEOPARQUET_VERSION, "primary_column": "geometry",
           "columns": {"geometry": column}}
    return {b"geo": json.dumps(geo).encode()}


def _bbox(geometry: pa.ChunkedArray) -> list[float] | None:
    import shapely

    values = geometry.drop_null()
    if not len(values):
        return None
    shapes = shapely.from_wkb(pc.cast(values, pa.binary()).to_numpy(zero_copy_only=False))
    return [float(v) for v in shapely.total_bounds(shapes)]
