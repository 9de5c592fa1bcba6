"""Issue 5.3: the job process (the Ray driver) is killed with SIGKILL mid-run, then the same
command runs again: only the missing inputs are processed and every input is in the output
exactly once. A half-written temporary file and a truncated committed file left behind are
neither counted nor allowed to spoil the result."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from tests.helpers import noise_image
from tests.reliability.jobproc import job_command, job_env, kill_job, start_job

N = 12


def _ids_by_file(out) -> dict[str, list[str]]:
    return {p.name: pq.read_table(p, columns=["id"]).column("id").to_pylist()
            for p in sorted(out.glob("part-*.parquet"))}


@pytest.mark.slow
def test_driver_killed_mid_run_then_rerun_completes_exactly_once(pipeline_env, demo_model,
                                                                   tmp_path):
    import ray

    ray.shutdown()  # the job starts its own Ray; give it this machine (ray_local restarts later)
    (tmp_path / "in").mkdir()
    names = [f"scene{i:02d}.jpg" for i in range(N)]
    for i, name in enumerate(names):
        noise_image(300 + 20 * i, 280, seed=i).save(tmp_path / "in" / name)
    out = tmp_path / "out"
    cmd = job_command("caption_remote_sensing.py", "--input", str(tmp_path / "in"),
                      "--output", str(out), "--model", str(demo_model), "--max-new-tokens", "24",
                      "--batch-size", "1", "--decode-rows-per-task", "1",
                      "--memory-per-actor-gb", "0.5")
    env, ray_tmp = job_env()
    try:
        # Run 1: killed with SIGKILL once a few answers are committed.
        proc = start_job(cmd, env, tmp_path / "run1.log")
        deadline = time.monotonic() + 240
        while len(list(out.glob("part-*.parquet")) if out.exists() else []) < 3:
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "run 1 wrote nothing in time"
            time.sleep(0.05)
        assert kill_job(proc)  # the driver, then the Ray it had started
        assert not (out / "_summary.json").exists()  # it never got to the end

        before = _ids_by_file(out)
        written = [i for ids in before.values() for i in ids]
        assert 3 <= len(written) < N and len(set(written)) == len(written)
        # What a crash can leave behind: a half-written temporary file (ours are renamed into
        # place only when whole) and, as a store without atomic rename could, a committed
        # file cut in half. Its rows are lost and must run again.
        truncated = next(iter(before))
        data = (out / truncated).read_bytes()
        (out / ".part-0badc0ffee.parquet.0123abcd.tmp").write_bytes(data[: len(data) // 2])
        (out / truncated).write_bytes(data[: len(data) // 2])
        lost = before.pop(truncated)
        kept = [i for ids in before.values() for i in ids]
        missing = sorted(set(names) - set(kept))

        # Run 2: the same command.
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                                check=False)
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-4000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_listed"] == N
    assert summary["rows_skipped"] == len(kept)  # only what is whole counts as done
    assert summary["rows_written"] == len(missing) == N - len(kept)
    assert summary["errors_by_stage"] == {}
    assert "is not whole Parquet" in log and truncated in log

    after = _ids_by_file(out)
    new_files = {name: ids for name, ids in after.items() if name not in before}
    assert sorted(i for ids in new_files.values() for i in ids) == missing  # only the missing
    assert set(lost) <= set(missing)
    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == names and len(ids) == len(set(ids))  # each input exactly once
    assert table.column("error").null_count == N
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert not any(n.endswith(".tmp") for n in leftovers)  # stale temporaries removed
    assert [n for n in leftovers if n.endswith(".corrupt")] == [
        n for n in leftovers if n.startswith(f".{truncated}.")]  # the cut file, set aside
    assert len(leftovers) == 1
