"""STAC input: `--input` a STAC ItemCollection (a GeoJSON FeatureCollection of items) or a
static catalogue's JSON (a Catalog or Collection, its items found by following its links),
local or on object storage, read with pystac.

Each item is one input row: `id` the item's id, `source_uri` the absolute href of its asset
`--asset NAME` (default: `visual` when the item has it, else its first image asset, by
media type `image/...`), `datetime` the item's datetime (else its `start_datetime`) as RFC 3339
text in UTC, and
`collection` its collection id. Items without such an asset are left out with a warning
naming them; when no item has one, the listing fails naming `--asset`. Relative hrefs resolve
against the JSON file that holds them. pystac reads through `FsspecStacIO`, the project's
fsspec filesystems (`pipeline.storage`), so `s3://` and `gs://` catalogues use the same
credentials from the environment as the images.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC

import pyarrow as pa

from pipeline.storage import open_fs, retrying

logger = logging.getLogger(__name__)

DEFAULT_ASSET = "visual"
# `datetime` is RFC 3339 text, as STAC writes it (a manifest's own `datetime` column of any
# type then still casts to the output schema)
STAC_FIELDS = (pa.field("datetime", pa.string()), pa.field("collection", pa.string()))
STAC_EXTENSIONS = (".json", ".geojson")
ITEMS_PER_TABLE = 10_000
MAX_NAMED = 10  # item ids named in a warning


def _stac_io():
    import pystac

    class FsspecStacIO(pystac.StacIO):
        """pystac's reads through the project's fsspec filesystems (local, s3://, gs://)."""

        def read_text(self, source, *args, **kwargs) -> str:
            fs, path = open_fs(str(source))
            return retrying(f"read {source}", lambda: fs.cat_file(path)).decode("utf-8")

        def write_text(self, dest, txt, *args, **kwargs) -> None:
            raise NotImplementedError("STAC input is read only")

    return FsspecStacIO()


def is_stac(path: str) -> bool:
    return path.lower().endswith(STAC_EXTENSIONS)


def iter_stac(uri: str, asset: str | None = None) -> Iterator[pa.Table]:
    """The input rows of a STAC ItemCollection or catalogue, in tables of ITEMS_PER_TABLE."""
    rows: list[dict] = []
    skipped: list[str] = []
    found = 0
    for item in _items(uri):
        href = _asset_href(item, asset, uri)
        if href is None:
            skipped.append(item.id)
            continue
        found += 1
        rows.append({"id": item.id, "source_uri": href, "datetime": _when(item),
                     "collection": item.collection_id})
        if len(rows) >= ITEMS_PER_TABLE:
            yield _table(rows)
            rows = []
    if skipped:
        logger.warning("--input %s: %d STAC item(s) without asset %r left out: %s", uri,
                       len(skipped), asset or "visual or an image asset",
                       ", ".join(skipped[:MAX_NAMED]))
    if not found:
        raise ValueError(f"--input {uri!r}: no STAC item has the asset "
                         f"{asset or 'visual (or any image asset)'!r} (--asset)")
    if rows:
        yield _table(rows)


def _items(uri: str):
    import pystac

    stac_io = _stac_io()
    try:
        data = json.loads(stac_io.read_text(uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"--input {uri!r}: not JSON ({exc})") from None
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "FeatureCollection":
        collection = pystac.ItemCollection.from_dict(data, preserve_dict=False)
        for item in collection:
            if item.get_self_href() is None:
                item.set_self_href(uri)  # relative asset hrefs resolve against the file
            yield item
    elif kind in ("Catalog", "Collection"):
        catalog = pystac.read_dict(data, href=uri, stac_io=stac_io)
        yield from catalog.get_items(recursive=True)
    elif kind == "Feature":
        yield pystac.Item.from_dict(data, href=uri)
    else:
        raise ValueError(f"--input {uri!r}: a .json input must be a STAC ItemCollection, "
                         f"Catalog, Collection or Item, got type {kind!r}")


def _asset_href(item, name: str | None, uri: str) -> str | None:
    from pystac.utils import make_absolute_href

    if name is not None:
        asset = item.assets.get(name)
    else:
        asset = item.assets.get(DEFAULT_ASSET) or next(
            (a for a in item.assets.values() if (a.media_type or "").startswith("image/")),
            None)
    if asset is None:
        return None
    base = item.get_self_href() or uri
    return make_absolute_href(asset.href, base)


def _when(item):
    when = item.datetime or item.common_metadata.start_datetime
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _table(rows: list[dict]) -> pa.Table:
    from pipeline.inputs import INPUT_FIELDS

    return pa.Table.from_pylist(rows, schema=pa.schema([*INPUT_FIELDS, *STAC_FIELDS]))
