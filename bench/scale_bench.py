"""Scale benchmark: the caption job on manifests of 1e5 to 1e7 rows that point at a few hundred
real images, with a model stand-in that answers instantly (`bench/instant_model.py`), so that
what is measured is the pipeline: listing, resume, splitting into decode-sized blocks,
decoding and writing.

    python bench/scale_bench.py --sizes 100000,1000000,10000000 --out bench/results/scale.json

Per size, one fresh run of the real job (`jobs/caption_remote_sensing.py`'s `main`, in a
child process that starts Ray with the stand-in's setup hook), stopped `--minutes` after its
first written row, reports:
- the time from the job's start to its first written row (the first Parquet file committed);
- the driver's peak RSS (VmHWM), the raylet's peak RSS without shared memory (RssAnon +
  RssFile) and the peak of the object-store pages it maps (RssShmem), sampled every 0.25 s;
- rows written per second from the first written row to the stop.

Then a kill-and-resume at `--resume-size`: run 1 on a fresh output is stopped (SIGKILL, the
driver and every process it started) once `--resume-after-rows` rows are written; run 2, the
same command, reports its time to the first new row; and a "half written" run on an output
that already holds the first half of the manifest (written by this script as the job's own
files would be: `pipeline.write.write_table`, 500 rows a file) reports the same. Every stop is
followed by a check that each id is in the output at most once and that no run wrote an id
an earlier run had written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tests.reliability.jobproc import descendants

JOB_FLAGS = ["--model", "instant", "--batch-size", "8", "--actors", "1",
             "--cpus-per-actor", "0.5", "--memory-per-actor-gb", "0", "--log-level", "WARNING"]
PREWRITTEN_ROWS_PER_FILE = 500


def job_child(argv: list[str]) -> int:
    """The job's own `main` after Ray starts with the stand-in installed in every worker."""
    import ray

    from jobs.caption_remote_sensing import main

    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "instant_model.install"})
    return main(argv)


def make_images(folder: Path, count: int) -> list[str]:
    """`count` 1024 px JPEG tiles (synthetic scenes), named img_NNN.jpg."""
    from model_bench import make_images as scenes

    folder.mkdir(parents=True)
    names = []
    for i, im in enumerate(scenes(count, seed=3)):
        name = f"img_{i:03d}.jpg"
        im.crop((0, 0, 1024, 1024)).resize((1024, 1024)).save(folder / name, quality=90)
        names.append(name)
    return names


def make_manifest(path: Path, rows: int, images: list[str]) -> None:
    """`rows` rows: id `tile/NNNNNNNNNN.jpg`, image_uri `images/img_K.jpg` (relative)."""
    writer = None
    names = pa.array([f"images/{n}" for n in images])
    for start in range(0, rows, 1_000_000):
        index = pa.array(np.arange(start, min(rows, start + 1_000_000)))
        ids = pc.binary_join_element_wise(
            "tile/", pc.utf8_lpad(index.cast(pa.string()), 10, "0"), ".jpg", "")
        uris = names.take(pc.cast(pc.remainder(index, len(images)), pa.int64()))
        table = pa.table({"id": ids, "image_uri": uris})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=1_000_000)
    writer.close()


def _status(pid: int) -> dict[str, int]:
    """/proc/<pid>/status memory fields in bytes (empty once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def committed(out: Path, seen: dict[str, int]) -> int:
    """Rows in the committed part files under `out` (`seen`: file -> rows, updated)."""
    for path in out.glob("part-*.parquet") if out.exists() else []:
        if path.name not in seen:
            try:
                seen[path.name] = pq.read_metadata(path).num_rows
            except Exception:  # noqa: BLE001 - renamed into place a moment later
                continue
    return sum(seen.values())


class Watch(threading.Thread):
    """Samples the job's memory and committed rows every 0.25 s."""

    def __init__(self, proc: subprocess.Popen, out: Path, start: float):
        super().__init__(daemon=True)
        self.proc, self.out, self.start_t = proc, out, start
        self.seen = {name: 0 for name in _existing(out)}  # earlier runs' files count 0
        self.first_row_s: float | None = None
        self.samples: list[tuple[float, int]] = []
        self.peaks = {"driver_hwm": 0, "raylet_rss": 0, "raylet_hwm": 0, "object_store": 0}
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.25):
            now = time.monotonic() - self.start_t
            driver = _status(self.proc.pid)
            self.peaks["driver_hwm"] = max(self.peaks["driver_hwm"], driver.get("VmHWM", 0))
            for pid in descendants(self.proc.pid):
                if _comm(pid) == "raylet":
                    s = _status(pid)
                    self.peaks["raylet_rss"] = max(self.peaks["raylet_rss"],
                                                   s.get("RssAnon", 0) + s.get("RssFile", 0))
                    self.peaks["raylet_hwm"] = max(self.peaks["raylet_hwm"], s.get("VmHWM", 0))
                    self.peaks["object_store"] = max(self.peaks["object_store"],
                                                     s.get("RssShmem", 0))
            rows = committed(self.out, self.seen)
            self.samples.append((now, rows))
            if rows and self.first_row_s is None:
                self.first_row_s = now


def _existing(out: Path) -> list[str]:
    return [p.name for p in out.glob("part-*.parquet")] if out.exists() else []


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the job's driver and every process it started, each by id."""
    started = descendants(proc.pid)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_job(manifest: Path, out: Path, *, minutes: float, stop_rows: int | None,
            first_row_limit_s: float, log: Path) -> dict:
    """One run of the job; stopped `minutes` after its first row, once `stop_rows` rows are
    committed, or when nothing was written within `first_row_limit_s`."""
    tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_ADDRESS": "local",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench")])}
    argv = [sys.executable, str(Path(__file__).resolve()), "_job", "--input", str(manifest),
            "--output", str(out), *JOB_FLAGS]
    start = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    watch = Watch(proc, out, start)
    watch.start()
    before = len(watch.seen)
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            now = time.monotonic() - start
            rows = watch.samples[-1][1] if watch.samples else 0
            if watch.first_row_s is None and now > first_row_limit_s:
                break
            if watch.first_row_s is not None and (
                    now > watch.first_row_s + minutes * 60
                    or (stop_rows is not None and rows >= stop_rows)):
                break
    finally:
        finished = proc.poll() is not None
        kill_tree(proc)
        watch.stop_event.set()
        watch.join()
        shutil.rmtree(tmp, ignore_errors=True)
    end_t, rows = watch.samples[-1] if watch.samples else (time.monotonic() - start, 0)
    rate = None
    if watch.first_row_s is not None and end_t > watch.first_row_s:
        first_rows = next(r for t, r in watch.samples if t >= watch.first_row_s)
        rate = (rows - first_rows) / (end_t - watch.first_row_s)
    mb = {k: round(v / 1024**2) for k, v in watch.peaks.items()}
    return {"first_row_s": watch.first_row_s, "rows_written": rows,
            "files_written": len(watch.seen) - before, "ran_s": round(end_t, 1),
            "rows_per_s_after_first": rate and round(rate, 1), "finished": finished,
            "peak_mb": mb}


def check_exactly_once(out: Path, earlier: set[str]) -> dict:
    """Ids in the output at most once; how many of them earlier runs had written."""
    ids = pq.read_table(out, columns=["id"]).column("id") if _existing(out) else pa.array([])
    unique = pc.count_distinct(ids).as_py() if len(ids) else 0
    new = set(ids.to_pylist()) - earlier
    return {"rows": len(ids), "distinct_ids": unique, "duplicates": len(ids) - unique,
            "new_ids": len(new)}


def prewrite_half(out: Path, rows: int) -> set[str]:
    """The first `rows` ids written as a previous run of the job would have (output schema,
    `PREWRITTEN_ROWS_PER_FILE` rows a file)."""
    from pipeline.columns import conform, output_schema
    from pipeline.tasks import CAPTION
    from pipeline.write import part_name, write_table

    schema = output_schema(CAPTION.extra_fields)
    index = pa.array(np.arange(rows))
    ids = pc.binary_join_element_wise(
        "tile/", pc.utf8_lpad(index.cast(pa.string()), 10, "0"), ".jpg", "")
    table = pa.table({"id": ids, "source_uri": ids, "task": pa.repeat("caption", rows),
                      "answer": pa.repeat("prewritten", rows)})
    for start in range(0, rows, PREWRITTEN_ROWS_PER_FILE):
        part = conform(table.slice(start, PREWRITTEN_ROWS_PER_FILE), schema)
        write_table(part, str(out), part_name(part, ("id",)))
    return set(ids.to_pylist())


def _mib(x: int) -> str:
    return f"{x} MiB"


def report(name: str, result: dict) -> None:
    peaks = result["peak_mb"]
    print(f"{name}: first row at {result['first_row_s']} s; {result['rows_written']} rows in"
          f" {result['files_written']} files by {result['ran_s']} s"
          f" ({result['rows_per_s_after_first']} rows/s after the first); driver peak"
          f" {_mib(peaks['driver_hwm'])}, raylet peak {_mib(peaks['raylet_rss'])} (+ object"
          f" store pages {_mib(peaks['object_store'])})", flush=True)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["_job"]:
        return job_child(sys.argv[2:])
    from model_bench import positive_int, provenance, source_commit, write_json

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000,10000000",
                   help="comma-separated manifest sizes (default: %(default)s)")
    p.add_argument("--images", type=positive_int, default=300, help="distinct images")
    p.add_argument("--minutes", type=float, default=1.0,
                   help="how long each run goes on after its first written row")
    p.add_argument("--first-row-limit", type=float, default=600.0,
                   help="seconds a run may take to write its first row before it is stopped")
    p.add_argument("--resume-size", type=int, default=1_000_000,
                   help="manifest size of the kill-and-resume runs (0: none)")
    p.add_argument("--resume-after-rows", type=positive_int, default=2000,
                   help="rows run 1 of the kill-and-resume writes before it is killed")
    p.add_argument("--workdir", type=Path, help="where manifests and outputs go (default: a "
                   "temporary folder, removed afterwards)")
    p.add_argument("--out", type=Path, help="JSON file for the results")
    args = p.parse_args(argv)
    try:
        sizes = [int(float(n)) for n in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if min(sizes) < 1 or args.resume_size < 0 or args.minutes <= 0:
        p.error("--sizes must be >= 1, --resume-size >= 0 and --minutes > 0")
    commit = source_commit()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="scale-bench-"))
    results: dict = {**provenance(commit), "cpus": os.cpu_count(), "flags": JOB_FLAGS,
                     "sizes": {}, "resume": {}}
    try:
        images = make_images(work / "images", args.images)
        for n in sizes:
            manifest = work / f"manifest-{n}.parquet"
            made = time.monotonic()
            make_manifest(manifest, n, images)
            print(f"{n} rows: manifest written in {time.monotonic() - made:.1f} s", flush=True)
            result = run_job(manifest, work / f"out-{n}", minutes=args.minutes, stop_rows=None,
                             first_row_limit_s=args.first_row_limit, log=work / f"job-{n}.log")
            result["exactly_once"] = check_exactly_once(work / f"out-{n}", set())
            results["sizes"][str(n)] = result
            report(f"{n} rows", result)
            write_json(args.out, results)
        if args.resume_size:
            results["resume"] = resume_runs(work, args, images)
            write_json(args.out, results)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def resume_runs(work: Path, args, images: list[str]) -> dict:
    n = args.resume_size
    manifest = work / f"manifest-{n}.parquet"
    if not manifest.exists():
        make_manifest(manifest, n, images)
    out, runs = work / f"resume-{n}", {}
    limits = {"minutes": args.minutes, "first_row_limit_s": args.first_row_limit}
    runs["killed"] = run_job(manifest, out, stop_rows=args.resume_after_rows,
                             log=work / "resume-1.log", **limits)
    written = set(pq.read_table(out, columns=["id"]).column("id").to_pylist())
    runs["killed"]["exactly_once"] = check_exactly_once(out, set())
    report("kill-and-resume, run 1 (killed)", runs["killed"])
    runs["rerun"] = run_job(manifest, out, stop_rows=None, log=work / "resume-2.log", **limits)
    runs["rerun"]["exactly_once"] = check_exactly_once(out, written)
    report("kill-and-resume, run 2 (first new row)", runs["rerun"])
    half = work / f"half-{n}"
    made = time.monotonic()
    written = prewrite_half(half, n // 2)
    print(f"half written: {n // 2} rows in {time.monotonic() - made:.1f} s", flush=True)
    runs["half_written"] = run_job(manifest, half, stop_rows=None, log=work / "resume-3.log",
                                   **limits)
    runs["half_written"]["exactly_once"] = check_exactly_once(half, written)
    report("half written, rerun (first new row)", runs["half_written"])
    for run in runs.values():
        print(f"  exactly once: {run['exactly_once']}", flush=True)
    return runs


if __name__ == "__main__":
    sys.exit(main())
