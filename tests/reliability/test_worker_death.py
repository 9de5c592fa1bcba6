"""Issue 5.2: the model actor is killed with SIGKILL in the middle of a run, from outside (the
test finds its process by the title Ray gives it). Ray restarts the actor and retries the
batches it held (Ray Data's actor pools default to `max_restarts=-1`, `max_task_retries=-1`);
the job finishes with every input exactly once."""

from __future__ import annotations

import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest

from pipeline.run import JobConfig, run
from tests.helpers import noise_image
from tests.reliability.jobproc import descendants

PREDICT_ACTOR = "MapWorker(MapBatches(Predictor))"


def _proc(pid: int, name: str) -> bytes:
    """/proc/<pid>/<name>, empty once the process is gone (Linux)."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def cmdline(pid: int) -> str:
    return _proc(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace")


def alive(pid: int) -> bool:
    stat = _proc(pid, "stat")
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie is dead


def predict_actor_pids() -> set[int]:
    """Processes below this one (the Ray it started) running the predict actor; Ray sets their
    title to `ray::MapWorker(MapBatches(Predictor))`."""
    return {pid for pid in descendants(os.getpid()) if PREDICT_ACTOR in cmdline(pid)}


@pytest.mark.slow
def test_predict_actor_killed_mid_run(ray_local, demo_model, tmp_path):
    (tmp_path / "in").mkdir()
    names = [f"tile{i:02d}.png" for i in range(10)]
    for i, name in enumerate(names):
        noise_image(320 + 16 * i, 300, seed=i).save(tmp_path / "in" / name)
    out = tmp_path / "out"
    seen: dict[str, object] = {}
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():  # once the first answers are written ...
            parts = list(out.glob("part-*.parquet")) if out.exists() else []
            pids = predict_actor_pids()
            if parts and pids:
                seen["files_at_kill"] = len(parts)
                seen["rows_at_kill"] = pq.read_table(out, columns=["id"]).num_rows
                seen["killed"] = pid = min(pids)
                os.kill(pid, signal.SIGKILL)  # ... kill the model actor's process
                break
            time.sleep(0.05)
        while not stop.is_set():  # and watch Ray start a new one
            fresh = predict_actor_pids() - {seen.get("killed")}
            if fresh:
                seen["restarted"] = min(fresh)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        summary = run(JobConfig(
            input=str(tmp_path / "in"), output=str(out), model=str(demo_model),
            max_new_tokens=24, batch_size=1, decode_rows_per_task=1, memory_per_actor_gb=0.5,
        ))
    finally:
        stop.set()
        thread.join(timeout=30)

    assert "killed" in seen, "the actor was never killed: the run ended first"
    assert 1 <= seen["rows_at_kill"] < len(names)  # killed mid-run
    assert seen.get("restarted") not in (None, seen["killed"])  # a new actor process took over
    assert not alive(seen["killed"])
    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == names and len(ids) == len(set(ids))  # each input exactly once
    assert table.column("error").null_count == len(names)
    assert table.column("answer").null_count == 0
    assert (summary.rows_listed, summary.rows_written, summary.rows_ok) == (10, 10, 10)
    assert summary.errors_by_stage == {}
