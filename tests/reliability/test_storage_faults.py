"""Issue 5.4: the S3 server (moto on 127.0.0.1) goes away for several seconds and comes back on
the same port: reads and writes retry and the run completes with every input exactly once; a
permanently missing object is an error row, straight away."""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import pyarrow as pa
import pytest

from pipeline.columns import output_schema
from pipeline.resume import read_output
from pipeline.run import JobConfig, run
from pipeline.storage import is_transient, open_fs, printable, read_bytes, retrying, to_uri
from pipeline.tasks import CAPTION
from pipeline.write import write_table
from tests.helpers import noise_image

# Longer than botocore's own retries against a refused connection (about 5 s), so the
# pipeline's retries (pipeline.storage.retrying) are what carries the job through.
OUTAGE_S = 7.0


class Outage:
    """Stop the moto server now (its socket closed: connections are refused) and start it
    again on the same port `seconds` later, from a thread. Objects survive: moto keeps them
    in this process."""

    def __init__(self, server, seconds: float = OUTAGE_S):
        self.server, self.seconds = server, seconds
        self.started = self.ended = None
        self.over = threading.Event()  # set once the server is back
        self._thread: threading.Thread | None = None

    def begin(self) -> Outage:
        self.server.stop()
        self.server._server.server_close()  # stop() alone leaves the port bound
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._restart, daemon=True)
        self._thread.start()
        return self

    def _restart(self) -> None:
        time.sleep(self.seconds)
        self.server.start()
        self.ended = time.monotonic()
        self.over.set()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=60)


@pytest.fixture()
def outages(moto_server):
    """Make outages; the server is always back up when the test ends."""
    made: list[Outage] = []

    def make(seconds: float = OUTAGE_S) -> Outage:
        made.append(Outage(moto_server, seconds))
        return made[-1]

    yield make
    for outage in made:
        outage.wait()


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    noise_image(360 + 20 * seed, 300, seed=seed).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def no_client_retries(monkeypatch):
    """botocore's own retries off (AWS_MAX_ATTEMPTS=1) for S3 clients made in this test, so
    the pipeline's retries alone must carry a read or write through an outage (botocore's
    jittered backoff would otherwise sometimes hide a short one)."""
    from s3fs import S3FileSystem

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    S3FileSystem.clear_instance_cache()
    yield
    S3FileSystem.clear_instance_cache()


def test_reads_and_writes_retry_through_an_outage(s3, outages, no_client_retries, caplog):
    s3.put_object(Bucket=s3.bucket, Key="in/a.jpg", Body=_jpeg(0))
    table = pa.table({"id": ["x", "y"]})
    with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
        outage = outages(5.0).begin()
        with ThreadPoolExecutor(2) as pool:
            read = pool.submit(read_bytes, f"s3://{s3.bucket}/in/a.jpg")
            write = pool.submit(write_table, table, f"s3://{s3.bucket}/out", "part-x.parquet")
            data, uri = read.result(timeout=120), write.result(timeout=120)
        outage.wait()
    assert data == _jpeg(0)
    assert uri == f"s3://{s3.bucket}/out/part-x.parquet"
    assert time.monotonic() - outage.started >= 5.0
    assert read_output(f"s3://{s3.bucket}/out", ["id"]).column("id").to_pylist() == ["x", "y"]
    assert f"storage: read s3://{s3.bucket}/in/a.jpg failed (EndpointConnectionError" in caplog.text
    assert f"storage: write s3://{s3.bucket}/out/part-x.parquet failed" in caplog.text

    # A missing object is not a fault to wait out: it fails at once, without a retry.
    caplog.clear()
    start = time.monotonic()
    with pytest.raises(FileNotFoundError):
        read_bytes(f"s3://{s3.bucket}/in/never_uploaded.jpg")
    assert time.monotonic() - start < 3 and "storage:" not in caplog.text


@pytest.mark.slow
def test_job_survives_the_object_store_going_away_twice(ray_local, s3, pipeline_env, outages,
                                                        demo_model, monkeypatch):
    names = [f"tile{i}.jpg" for i in range(8)]
    for i, name in enumerate(names):
        s3.put_object(Bucket=s3.bucket, Key=f"in/{name}", Body=_jpeg(i))
    rows = [{"id": n, "image_uri": n} for n in names]
    rows.append({"id": "gone.jpg", "image_uri": "gone.jpg"})  # never uploaded
    s3.put_object(Bucket=s3.bucket, Key="in/manifest.jsonl",
                  Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    output = f"s3://{s3.bucket}/out"

    # Outage 1 starts as soon as the driver has listed the inputs and the output, so the
    # decode tasks' reads (and the sink's start) meet it. Outage 2 starts when the first
    # output file appears, so the remaining writes meet it.
    run_module = importlib.import_module("pipeline.run")  # `pipeline.run` is also the function
    first, second = outages(), outages()
    done_keys = run_module.done_keys

    def done_keys_then_outage(*args, **kwargs):
        done = done_keys(*args, **kwargs)
        first.begin()
        return done

    monkeypatch.setattr(run_module, "done_keys", done_keys_then_outage)
    client = boto3.client("s3", endpoint_url=pipeline_env["AWS_ENDPOINT_URL"])
    files_at_second, watch_errors, job_done = [], [], threading.Event()

    def watch() -> None:
        if not first.over.wait(timeout=300):
            return
        while not job_done.is_set():
            try:
                count = client.list_objects_v2(Bucket=s3.bucket, Prefix="out/part-")["KeyCount"]
            except Exception as exc:  # noqa: BLE001 - keep watching; reported if it matters
                watch_errors.append(repr(exc))
                count = 0
            if count:
                files_at_second.append(count)
                second.begin()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    summary = run(JobConfig(
        input=f"s3://{s3.bucket}/in/manifest.jsonl", output=output, model=str(demo_model),
        max_new_tokens=24, batch_size=1, decode_rows_per_task=1, memory_per_actor_gb=0.5,
    ))  # about a second per image: the second outage starts well before the last write
    finished = time.monotonic()
    job_done.set()
    watcher.join(timeout=60)
    second.wait()

    assert files_at_second, f"no output file seen before the job ended: {watch_errors[-3:]}"
    assert first.ended is not None and second.ended is not None
    assert files_at_second[0] < len(names)  # the second outage hit mid-run
    assert finished > second.ended  # the job outlived the second outage
    table = read_output(output)
    assert table.schema == output_schema(CAPTION.extra_fields)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted([*names, "gone.jpg"]) and len(ids) == len(set(ids))
    by_id = {r["id"]: r for r in table.to_pylist()}
    for name in names:
        assert by_id[name]["error"] is None, by_id[name]["error"]
        assert by_id[name]["answer"] is not None
    assert by_id["gone.jpg"]["error_stage"] == "read"
    assert by_id["gone.jpg"]["error"] == f"FileNotFoundError: {s3.bucket}/in/gone.jpg"
    assert (summary.rows_listed, summary.rows_written, summary.rows_ok) == (9, 9, 8)
    assert summary.errors_by_stage == {"read": 1}
    assert json.loads(read_bytes(f"{output}/_summary.json"))["rows_written"] == 9


def test_which_errors_are_retried():
    import errno

    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    transient = [
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("slow"),
        OSError(errno.ECONNREFUSED, "refused"), client_error("SlowDown", 503),
        client_error("InternalError", 500),
    ]
    wrapped = OSError("s3fs gave up")
    wrapped.__cause__ = EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    transient.append(wrapped)
    permanent = [
        FileNotFoundError("bucket/key"), PermissionError("denied"), ValueError("bad data"),
        client_error("AccessDenied", 403), client_error("NoSuchBucket", 404),
        OSError(errno.ENOSPC, "disk full"),
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


def test_retrying_gives_up_after_its_attempts(monkeypatch):
    monkeypatch.setattr("pipeline.storage.IO_BACKOFF_S", 0.01)
    calls = []

    def refused():
        calls.append(1)
        raise ConnectionRefusedError("refused")

    with pytest.raises(ConnectionRefusedError):
        retrying("read s3://b/k", refused, attempts=4)
    assert len(calls) == 4
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("b/k")

    with pytest.raises(FileNotFoundError):
        retrying("read s3://b/k", missing)
    assert len(calls) == 1  # not retried


def test_non_utf8_local_names_round_trip_through_a_file_uri(tmp_path):
    name = os.path.join(os.fsencode(tmp_path), b"r\xe9sum\xe9 scan.png")
    with open(name, "wb") as f:
        f.write(b"bytes of the image")
    path = os.fsdecode(name)
    fs, _ = open_fs(str(tmp_path))
    uri = to_uri(fs, path)
    assert uri == f"file://{tmp_path}/r%E9sum%E9%20scan.png"
    assert open_fs(uri)[1] == path and read_bytes(uri) == b"bytes of the image"
    assert printable(os.path.basename(path)) == "r\\xe9sum\\xe9 scan.png"
    assert to_uri(fs, str(tmp_path / "plain.png")) == str(tmp_path / "plain.png")  # unchanged
