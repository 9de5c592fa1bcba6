"""Running a job script as its own process, the way a user does: `python jobs/<job>.py ...`
starting its own local Ray (never the test process's), and stopping it and everything it
started, by process id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.helpers import REPO


def job_env(**extra: str) -> tuple[dict[str, str], Path]:
    """The test environment (moto endpoint, credentials, Ray token) plus RAY_ADDRESS=local (a
    new Ray instance, not one another process started) and a fresh short RAY_TMPDIR (Unix
    socket paths must stay short) that holds all of that Ray's logs. Returns (env, tmpdir)."""
    tmpdir = Path(os.path.realpath("/tmp")) / f"rj{uuid.uuid4().hex[:6]}"
    tmpdir.mkdir()
    env = dict(os.environ)
    env.update({"RAY_ADDRESS": "local", "RAY_TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1",
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1", **extra})
    return env, tmpdir


def job_command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / script), *args]


def start_job(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (from /proc; Linux)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        tree.setdefault(int(stat.rsplit(b")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_job(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the job's driver process, then whatever it had started (its local Ray), each by
    id. Returns the ids of the processes it had started."""
    started = descendants(proc.pid)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.5)
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return started
