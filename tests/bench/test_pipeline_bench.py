"""bench/pipeline_bench.py's running cluster: jobs connect to it one after another, each a job
of its own on the CPUs asked for, and nothing of it is left once the bench is done with it.
What the bench measures is recorded in bench/RESULTS.md, not asserted here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import pipeline_bench

# A script of its own: the test process may hold a Ray of its own (the `ray_local` fixture).
# Each job runs as the bench runs them on a running cluster, with a driver process of its own.
SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import pipeline_bench


def job(address):
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        return {"job": ray.get_runtime_context().get_job_id(),
                "task_pid": ray.get(ray.remote(lambda: os.getpid()).remote()),
                "cpus": ray.cluster_resources().get("CPU"), "driver_pid": os.getpid()}
    finally:
        ray.shutdown()


if __name__ == "__main__":
    with pipeline_bench.running_cluster(2) as address:
        jobs = [pipeline_bench.in_fresh_process(job, address) for _ in range(2)]
        auth_inside = os.environ.get("RAY_AUTH_MODE")
    print(json.dumps({"address": address, "jobs": jobs, "auth_inside": auth_inside,
                      "auth_after": os.environ.get("RAY_AUTH_MODE"), "pid": os.getpid()}))
"""


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, int(port))) == 0


def test_running_cluster_serves_one_job_after_another_and_stops_with_its_processes(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    result = subprocess.run([sys.executable, str(script), str(BENCH)], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    first, second = out["jobs"]
    assert first["job"] != second["job"]  # each connection is a job of its own...
    assert len({first["driver_pid"], second["driver_pid"], out["pid"]}) == 3  # ...and process
    assert first["cpus"] == second["cpus"] == 2.0
    assert first["task_pid"] not in (first["driver_pid"], out["pid"])  # tasks ran in Ray
    # Token auth is on for the bench's jobs only while the cluster runs.
    assert out["auth_inside"] == "token" and out["auth_after"] is None
    assert not _listening(out["address"])  # the head is gone...
    # ...and so is every process it started: none names the cluster's GCS port.
    port = out["address"].rsplit(":", 1)[1]
    left = subprocess.run(["pgrep", "-af", f"[:=]{port}( |$)"], capture_output=True,
                          text=True, check=False).stdout
    assert left.strip() == "", left


@pytest.mark.parametrize(("flag", "value"), [("--cluster", "warm"), ("--layouts", "fused"),
                                             ("--repeats", "0")])
def test_a_bad_flag_is_named(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pipeline_bench.main(["--images", "8", flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err
