"""Synthetic Cloud-Optimised GeoTIFFs written with rasterio for the raster tests: a UTM CRS,
512 px internal tiles and overviews, like a real scene, but small."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CRS = "EPSG:32633"  # WGS 84 / UTM zone 33N
ORIGIN = (500_000.0, 4_600_000.0)
RES = 0.5  # metres per pixel


def scene_array(count: int, height: int, width: int, dtype: str, seed: int = 0) -> np.ndarray:
    """[count, height, width]: a smooth gradient plus noise, each band on its own range (band
    k lies around 1000 * k for 16-bit data, so a shared stretch would flatten the low bands)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = (xx / width + yy / height) / 2
    bands = []
    for k in range(1, count + 1):
        noise = rng.random((height, width))
        if dtype == "uint8":
            band = 20 + 60 * k * base + 20 * noise
        else:
            band = 1000 * k + 400 * k * base + 50 * noise
        bands.append(band)
    return np.stack(bands).astype(dtype)


def write_cog(path: Path | str, data: np.ndarray, *, nodata: float | None = None,
              crs: str | None = CRS, transform=None, colorinterp=None) -> Path:
    """`data` [count, h, w] as a COG: 512 px tiles, deflate, overviews down to below 512."""
    import rasterio
    import rasterio.shutil
    from rasterio.io import MemoryFile
    from rasterio.transform import from_origin

    count, height, width = data.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count,
               "dtype": str(data.dtype), "tiled": True, "blockxsize": 512, "blockysize": 512}
    if crs is not None:
        profile["crs"] = crs
        profile["transform"] = transform or from_origin(*ORIGIN, RES, RES)
    if nodata is not None:
        profile["nodata"] = nodata
    with MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(data)
            if colorinterp is not None:
                ds.colorinterp = colorinterp
        with mem.open() as ds:
            rasterio.shutil.copy(ds, str(path), driver="COG", blocksize=512, compress="deflate",
                                 overview_resampling="average")
    return Path(path)


def rgb_uint8_scene(path: Path | str, width: int = 1200, height: int = 900) -> Path:
    """3-band uint8, red/green/blue colour interpretation, no nodata."""
    from rasterio.enums import ColorInterp

    return write_cog(path, scene_array(3, height, width, "uint8"),
                     colorinterp=[ColorInterp.red, ColorInterp.green, ColorInterp.blue])


MARGIN = 300  # nodata columns on the left of the 16-bit scene


def uint16_nodata_scene(path: Path | str, width: int = 1100, height: int = 1000) -> Path:
    """4-band uint16 with nodata 0 on its left MARGIN columns (an orbit's edge)."""
    data = scene_array(4, height, width, "uint16", seed=1)
    data[:, :, :MARGIN] = 0
    return write_cog(path, data, nodata=0)
