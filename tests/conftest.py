"""Fixtures shared by tests/pipeline and tests/jobs: a real moto S3 server, a real local Ray.

Order matters: the S3 endpoint, fake credentials and the demo-model home are put in the
environment before Ray starts, so Ray's workers inherit them like a user's shell would pass
them on.
"""

from __future__ import annotations

import os
import secrets
import sys
import uuid
from pathlib import Path

import pytest

from tests.helpers import free_port


@pytest.fixture(scope="session")
def moto_server():
    """The session's moto S3 server on 127.0.0.1. Its objects live in this process, so they
    survive stopping and restarting the server (tests/reliability/test_storage_faults.py)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pipeline_env(moto_server, tmp_path_factory):
    """Moto S3 on 127.0.0.1, AWS_* variables, Ray auth token and demo-model home, for the
    session (restored afterwards)."""
    port = moto_server.get_host_and_port()[1]
    home = tmp_path_factory.mktemp("env")
    token = home / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    values = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Ray 2.59+ turns on token auth for new local clusters (ray.init) and would write a
        # token to ~/.ray/auth_token; point it at one of ours instead.
        "RAY_AUTH_TOKEN_PATH": str(token),
        "FLEXATTN_HOME": os.environ.get("FLEXATTN_HOME") or str(home / "flexattn"),
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield values
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture()
def ray_local(pipeline_env):
    """A real local Ray with 2 CPUs, started on first use and shared by later tests."""
    import ray

    if not ray.is_initialized():
        # address="local": always a new instance, never a cluster another process started.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=512 * 1024**2)
    yield ray


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray():
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture()
def s3(pipeline_env):
    """A boto3 client on the moto server and a fresh bucket name."""
    import boto3

    client = boto3.client("s3", endpoint_url=pipeline_env["AWS_ENDPOINT_URL"])
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket
    return client


@pytest.fixture(scope="session")
def demo_model(pipeline_env) -> Path:
    from flexattn.demo_model import demo_model_path

    return demo_model_path()
