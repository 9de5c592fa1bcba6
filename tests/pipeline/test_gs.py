"""`gs://` through fsspec: gcsfs (the `gs` extra) parses the URIs the jobs take, and listing,
manifests and reads of a `gs://` prefix work end to end on a stand-in file system registered
under the `gs` protocol (a folder on disk behind the object-store code path: no network here).
"""

from __future__ import annotations

import fsspec
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry

from pipeline.inputs import InputConfig, list_inputs
from pipeline.storage import is_local, open_fs, read_bytes, to_uri, write_bytes


@pytest.fixture
def anonymous_gcs(monkeypatch):
    """gcsfs without a credentials search (which probes the metadata server for seconds)."""
    pytest.importorskip("gcsfs", reason="the gs extra: pip install .[gs]")
    monkeypatch.setitem(fsspec.config.conf, "gcs", {"token": "anon"})


def test_gcsfs_parses_gs_and_gcs_uris(anonymous_gcs):
    import gcsfs

    fs, path = open_fs("gs://my-bucket/tiles/")
    assert isinstance(fs, gcsfs.GCSFileSystem) and not is_local(fs)
    assert path == "my-bucket/tiles"
    assert fs.split_path("my-bucket/tiles/2024/a b.tif") == ("my-bucket", "tiles/2024/a b.tif",
                                                           None)
    assert to_uri(fs, path + "/2024/a b.tif") == "gs://my-bucket/tiles/2024/a b.tif"
    fs2, path2 = open_fs("gcs://my-bucket/tiles/x.tif")
    assert type(fs2) is type(fs) and path2 == "my-bucket/tiles/x.tif"
    assert to_uri(fs2, path2) == "gs://my-bucket/tiles/x.tif"  # one scheme in the output


class FolderAsGcs(DirFileSystem):
    """`gs://bucket/key` served from ROOT/bucket/key: fsspec's object-store code path (not a
    LocalFileSystem, URIs with the gs scheme) over real files."""

    protocol = ("gs", "gcs")
    root_marker = ""
    cachable = False
    ROOT = ""

    def __init__(self, *args, **kwargs):
        super().__init__(path=self.ROOT, fs=LocalFileSystem())


@pytest.fixture
def gs_root(tmp_path, monkeypatch):
    monkeypatch.setattr(FolderAsGcs, "ROOT", str(tmp_path))
    monkeypatch.setitem(_registry, "gs", FolderAsGcs)
    monkeypatch.setitem(_registry, "gcs", FolderAsGcs)
    tiles = tmp_path / "bucket" / "tiles"
    for name in ("2024/a.jpg", "2024/b.png", "2025/c.tif", "d.jpg", "notes.txt", "_x.jpg"):
        (tiles / name).parent.mkdir(parents=True, exist_ok=True)
        (tiles / name).write_bytes(name.encode())
    return tmp_path


def test_listing_a_gs_prefix(gs_root):
    table = list_inputs(InputConfig("gs://bucket/tiles/"))
    assert table.column("id").to_pylist() == ["2024/a.jpg", "2024/b.png", "2025/c.tif", "d.jpg"]
    assert table.column("source_uri").to_pylist() == [
        "gs://bucket/tiles/2024/a.jpg", "gs://bucket/tiles/2024/b.png",
        "gs://bucket/tiles/2025/c.tif", "gs://bucket/tiles/d.jpg"]
    glob = list_inputs(InputConfig("gs://bucket/tiles/2024/*.jpg"))
    assert glob.column("source_uri").to_pylist() == ["gs://bucket/tiles/2024/a.jpg"]
    assert read_bytes("gs://bucket/tiles/2025/c.tif") == b"2025/c.tif"


def test_gs_manifest_resolves_relative_paths_and_writes(gs_root):
    write_bytes("gs://bucket/manifests/m.csv",
                b"id,image_uri\none,../tiles/d.jpg\ntwo,2024/e.jpg\nthree,gs://other/f.jpg\n")
    assert (gs_root / "bucket" / "manifests" / "m.csv").is_file()
    table = list_inputs(InputConfig("gs://bucket/manifests/m.csv"))
    assert table.column("source_uri").to_pylist() == [
        "gs://bucket/tiles/d.jpg", "gs://bucket/manifests/2024/e.jpg", "gs://other/f.jpg"]
    assert read_bytes(table.column("source_uri")[0].as_py()) == b"d.jpg"
