"""Filesystems for local paths and object-storage URIs, through fsspec.

Credentials and endpoints come from the environment the way each backend reads them: for S3,
the standard AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`, `AWS_PROFILE`) or an instance role; for `gs://`
(`pip install .[gs]`: gcsfs), Google's application-default credentials, as gcsfs looks them
up: the key file named by `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's user credentials, then the
metadata server (a GCE VM's service account, Workload Identity on GKE). Nothing here takes or logs a secret,
and `redact_secrets_in_logs` (the jobs call it) keeps libraries that log request headers at
DEBUG level (botocore) from writing credential values into the job's log.

Transient storage faults (connection refused or reset, timeouts, throttling, 5xx) are retried
by `retrying` with exponential backoff, on top of the client's own retries, so an object store
that goes away for a few seconds does not turn a job's rows into errors. A missing object or a
permission error is not retried: it is the row's error.

Local file names that are not valid UTF-8 (old archives) cannot be Arrow strings; `to_uri`
gives them as percent-encoded `file://` URIs (RFC 8089), which `open_fs` decodes back to the
exact bytes.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import posixpath
import time
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Attempts of one storage operation and the first pause between them (doubling, capped):
# 1 + 2 + 4 + 8 + 8 s of pauses, plus the client's own retries inside each attempt (about 5 s
# for botocore against a refused connection): an outage of about half a minute is survived.
IO_ATTEMPTS = 6
IO_BACKOFF_S = 1.0
IO_BACKOFF_MAX_S = 8.0
TRANSIENT_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN, errno.EBUSY,
})
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
})
FILE_SCHEME = "file://"


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        types += [BotoConnectionError, HTTPClientError]
    except ImportError:  # no S3 support installed
        pass
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError

        types += [ClientConnectionError, ClientPayloadError]
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    except ImportError:
        pass
    return tuple(types)


def is_transient(exc: BaseException, _depth: int = 0) -> bool:
    """A storage error worth retrying: the service was unreachable or overloaded, not a
    missing object, a permission problem or bad data. Looks through wrapped causes."""
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError
                  | NotADirectoryError | FileExistsError):
        return False
    if isinstance(exc, _transient_types()):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in TRANSIENT_CODES or status >= 500
    cause = exc.__cause__ or exc.__context__
    return cause is not None and _depth < 8 and is_transient(cause, _depth + 1)


def retrying(what: str, fn: Callable[[], T], attempts: int | None = None) -> T:
    """`fn()`, retried with exponential backoff while it fails with a transient storage error.
    `what` (an operation and a URI, never a credential) names it in the warnings."""
    attempts = attempts or IO_ATTEMPTS
    delay = IO_BACKOFF_S
    for attempt in range(1, attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            logger.warning("storage: %s failed (%s: %s); attempt %d/%d, retrying in %.1fs",
                           what, type(exc).__name__, str(exc)[:200], attempt, attempts, delay)
        time.sleep(delay)
        delay = min(delay * 2, IO_BACKOFF_MAX_S)
    return fn()  # the last attempt: its error is the caller's


def open_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or a `scheme://` URI."""
    uri = str(uri)
    if uri.startswith(FILE_SCHEME + "/"):
        # RFC 8089: the path of a file URI is percent-encoded bytes (see `to_uri`).
        path = os.fsdecode(urllib.parse.unquote_to_bytes(uri[len(FILE_SCHEME):]))
        return fsspec.filesystem("file"), path.rstrip("/") if len(path) > 1 else path
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/") if len(path) > 1 else path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def is_text(path: str) -> bool:
    """Whether `path` is valid Unicode (a name of undecodable bytes holds surrogates)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: str) -> str:
    """`path` as valid text: undecodable bytes of a local name shown as `\\xNN`."""
    return path if is_text(path) else os.fsencode(path).decode("utf-8", "backslashreplace")


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI a user would type: a plain absolute path locally (a percent-encoded `file://`
    URI when the name is not valid UTF-8), `s3://bucket/key` remotely."""
    if is_local(fs):
        if is_text(path):
            return path
        return FILE_SCHEME + urllib.parse.quote(os.fsencode(path), safe="/")
    return fs.unstrip_protocol(path)


def join(fs: fsspec.AbstractFileSystem, base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def read_bytes(uri: str) -> bytes:
    def read() -> bytes:
        fs, path = open_fs(uri)
        with fs.open(path, "rb") as f:
            return f.read()

    return retrying(f"read {printable(uri)}", read)


def write_bytes(uri: str, data: bytes) -> None:
    def write() -> None:
        fs, path = open_fs(uri)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)

    retrying(f"write {printable(uri)}", write)


# Environment variables whose values are credentials. Libraries may log them at DEBUG level
# (botocore logs request headers, session token included); `redact_secrets_in_logs` keeps
# them out of whatever the job's log handlers write.
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
    "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING",
    "GOOGLE_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RAY_AUTH_TOKEN",
)
REDACTED = "***"


class RedactingFormatter(logging.Formatter):
    """Formats with `inner`, then replaces every secret value (message, arguments and
    traceback alike) with `***`."""

    def __init__(self, inner: logging.Formatter | None, secrets: list[str]):
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.secrets = sorted(secrets, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text


def redact_secrets_in_logs(logger: logging.Logger | None = None) -> int:
    """Make the handlers of `logger` (default: the root logger, as `logging.basicConfig` sets
    it up) redact the values of SECRET_ENV_VARS. Returns the number of handlers changed."""
    secrets = [v for name in SECRET_ENV_VARS if len(v := os.environ.get(name, "")) >= 8]
    handlers = (logger or logging.getLogger()).handlers
    for handler in handlers:
        if secrets and not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter, secrets))
    return len(handlers) if secrets else 0
