"""STAC input, listed on the driver (no cluster): a static catalogue written with pystac, an
ItemCollection, the asset choice and its errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from pipeline.inputs import InputConfig, list_inputs


def _item(item_id: str, assets: dict, when=datetime(2024, 5, 1, 10, 30, tzinfo=UTC)):
    import pystac

    item = pystac.Item(id=item_id, geometry=None, bbox=None, datetime=when, properties={})
    for name, (href, media_type) in assets.items():
        item.add_asset(name, pystac.Asset(href=href, media_type=media_type))
    return item


def test_static_catalogue_items_become_rows(tmp_path):
    import pystac

    catalog = pystac.Catalog(id="root", description="scenes")
    collection = pystac.Collection(
        id="orthophotos", description="d", license="proprietary",
        extent=pystac.Extent(pystac.SpatialExtent([[-180, -90, 180, 90]]),
                             pystac.TemporalExtent([[None, None]])))
    catalog.add_child(collection)
    collection.add_item(_item("a", {"visual": (str(tmp_path / "a.tif"), pystac.MediaType.COG)}))
    collection.add_item(_item("b", {"data": ("../../b.tif", pystac.MediaType.GEOTIFF),
                                    "thumbnail": ("b.png", pystac.MediaType.PNG)}))
    collection.add_item(_item("c", {"metadata": ("c.xml", pystac.MediaType.XML)}))
    catalog.normalize_hrefs(str(tmp_path / "stac"))
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)

    table = list_inputs(InputConfig(str(tmp_path / "stac" / "catalog.json")))
    rows = {r["id"]: r for r in table.to_pylist()}
    assert set(rows) == {"a", "b"}  # c has no image asset: left out
    assert rows["a"]["source_uri"] == str(tmp_path / "a.tif")
    # relative to the item's own JSON (stac/orthophotos/b/b.json), then the image asset
    assert rows["b"]["source_uri"] == str(tmp_path / "stac" / "b.tif")
    assert rows["a"]["collection"] == "orthophotos"
    assert rows["a"]["datetime"] == "2024-05-01T10:30:00Z"

    named = list_inputs(InputConfig(str(tmp_path / "stac" / "catalog.json"), asset="thumbnail"))
    assert named.column("id").to_pylist() == ["b"]
    assert named.column("source_uri").to_pylist() == [str(tmp_path / "stac" / "orthophotos" /
                                                          "b" / "b.png")]
    with pytest.raises(ValueError, match="--asset"):
        list_inputs(InputConfig(str(tmp_path / "stac" / "catalog.json"), asset="nir"))


def test_item_collection_and_bad_json(tmp_path):
    items = {"type": "FeatureCollection", "features": [
        _item(f"s{i}", {"visual": (f"scenes/s{i}.tif", "image/tiff")}).to_dict()
        for i in range(2)]}
    (tmp_path / "items.json").write_text(json.dumps(items))
    table = list_inputs(InputConfig(str(tmp_path / "items.json")))
    assert table.column("id").to_pylist() == ["s0", "s1"]
    assert table.column("source_uri").to_pylist() == [str(tmp_path / "scenes" / f"s{i}.tif")
                                                      for i in range(2)]
    items["features"][1]["id"] = "s0"
    (tmp_path / "dupes.json").write_text(json.dumps(items))
    with pytest.raises(ValueError, match="duplicate ids"):
        list_inputs(InputConfig(str(tmp_path / "dupes.json")))
    (tmp_path / "other.json").write_text(json.dumps({"type": "Point", "coordinates": [0, 0]}))
    with pytest.raises(ValueError, match="STAC ItemCollection"):
        list_inputs(InputConfig(str(tmp_path / "other.json")))
    with pytest.raises(ValueError, match="--asset"):
        InputConfig("x.json", asset=" ")
