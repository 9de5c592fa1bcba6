"""Filesystems for local paths and object-storage URIs, through fsspec.

Credentials and endpoints come from the environment the way each backend reads them: for S3,
the standard AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`, `AWS_PROFILE`) or an instance role; for `gs://`,
Google application-default credentials (needs `gcsfs`). Nothing here takes or logs a secret.
"""

from __future__ import annotations

import posixpath

import fsspec
from fsspec.implementations.local import LocalFileSystem


def open_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or a `scheme://` URI."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path.rstrip("/") if len(path) > 1 else path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI a user would type: a plain absolute path locally, `s3://bucket/key` remotely."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def join(fs: fsspec.AbstractFileSystem, base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def read_bytes(uri: str) -> bytes:
    fs, path = open_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = open_fs(uri)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)
