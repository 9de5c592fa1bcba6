"""Scale benchmark: the caption job on manifests of 1e6 to 1e8 rows that point at a few hundred
real images, run as a user runs it: the real demo model (`--model demo`, 2 new tokens, batch
8) in the default 1-CPU actor, on this machine's CPUs.

    python bench/scale_bench.py --sizes 1000000,10000000 --out bench/results/scale.json
    python bench/scale_bench.py --sizes 100000000 --shards 100 --minutes 0 --kills none
    python bench/scale_bench.py --model instant ...   # the stand-in that answers instantly

Per size and layout (`--layouts separate,in-actors`: decode in CPU tasks, or inside the
actors with `--decode-in-actors`), one fresh run of the real job (`jobs/caption_remote_sensing
.py`'s `main`, in a child process that starts a local Ray), stopped `--minutes` after its first
durable row, reports:
- the time from the job's start to its first durable row (the first Parquet file committed);
- rows answered against rows durable, sampled every `--sample-s` seconds. Answered rows are
  the rows of each predict batch as the actor finished it (its `predict: N rows` log line,
  which a `worker_process_setup_hook` sends to a file per worker); durable rows are the rows
  of the committed Parquet files;
- the driver's peak RSS (VmHWM), the raylet's peak RSS without shared memory (RssAnon +
  RssFile) and the peak of the object-store pages it maps (RssShmem), sampled every 0.25 s.

Then the kills (`--kills 30,120,300`, at `--resume-size`): run 1 on a fresh output is killed
(SIGKILL, the driver and every process it started) 30 s after its start, run 2 (the same
command, a rerun) 120 s after its start, run 3 300 s after its start, and a last rerun goes on
until its first new durable row. For each kill: rows answered before it and not durable (the
loss), against the bound max(2 x batch x actors, rows answered in the 60 s before the kill).
After every run: each id is in the output at most once, and no run wrote an id that an
earlier run had written.

`--model instant` swaps in `bench/instant_model.py` (answers at once, asks 0.5 CPU) to measure
the pipeline without generation; it hides what users hit (it is how a starved write went
unseen), so it is not the default.
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
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tests.reliability.jobproc import descendants

BATCH, ACTORS = 8, 1
JOB_FLAGS = ["--max-new-tokens", "2", "--batch-size", str(BATCH), "--actors", str(ACTORS),
             "--log-level", "WARNING"]
MODEL_FLAGS = {
    "demo": ["--model", "demo"],  # the default 1-CPU, 2 GB actor
    "instant": ["--model", "instant", "--cpus-per-actor", "0.5", "--memory-per-actor-gb", "0"],
}
LAYOUT_FLAGS = {"separate": [], "in-actors": ["--decode-in-actors"]}
ANSWER_LOG_ENV = "SCALE_BENCH_ANSWER_LOG"
PREWRITTEN_ROWS_PER_FILE = 500


def job_child(argv: list[str]) -> int:
    """The job's own `main` after Ray starts with the bench's worker hook (answer log, and the
    stand-in model when asked)."""
    import ray

    from jobs.caption_remote_sensing import main

    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "scale_bench.worker_setup"})
    return main(argv)


def worker_setup() -> None:
    """Ray's `worker_process_setup_hook`: the predict stage's per-batch log lines go to a file
    of this worker under $SCALE_BENCH_ANSWER_LOG; `--model instant` installs the stand-in."""
    import logging

    folder = os.environ.get(ANSWER_LOG_ENV)
    if folder:
        handler = logging.FileHandler(Path(folder) / f"{os.getpid()}.log")
        handler.setFormatter(logging.Formatter("%(created)f %(message)s"))
        log = logging.getLogger("pipeline.predict")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    if os.environ.get("SCALE_BENCH_INSTANT") == "1":
        import instant_model

        instant_model.install()


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


def make_manifest(path: Path, rows: int, images: list[str], shards: int = 1) -> None:
    """`rows` rows: id `tile/NNNNNNNNNN.jpg`, image_uri `../images/img_K.jpg` (relative); one
    Parquet file `path`, or a folder `path` of `shards` files."""
    names = pa.array([f"../images/{n}" if shards > 1 else f"images/{n}" for n in images])
    per_shard = -(-rows // shards)
    if shards > 1:
        path.mkdir(parents=True)
    for shard in range(shards):
        target = path / f"part-{shard:05d}.parquet" if shards > 1 else path
        writer = None
        first, last = shard * per_shard, min(rows, (shard + 1) * per_shard)
        for start in range(first, last, 1_000_000):
            index = pa.array(np.arange(start, min(last, start + 1_000_000)))
            ids = pc.binary_join_element_wise(
                "tile/", pc.utf8_lpad(index.cast(pa.string()), 10, "0"), ".jpg", "")
            uris = names.take(pc.cast(pc.remainder(index, len(images)), pa.int64()))
            table = pa.table({"id": ids, "image_uri": uris})
            writer = writer or pq.ParquetWriter(target, table.schema)
            writer.write_table(table, row_group_size=100_000)
        if writer is not None:
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


def answered(folder: Path, until: float | None = None) -> list[tuple[float, int]]:
    """(wall time, rows) of every predict batch logged under `folder`, sorted."""
    batches = []
    for log in folder.glob("*.log"):
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "predict:" and parts[3] == "rows":
                t = float(parts[0])
                if until is None or t <= until:
                    batches.append((t, int(parts[2])))
    return sorted(batches)


class Watch(threading.Thread):
    """Samples the job's memory every 0.25 s, and answered / durable rows every `sample_s`."""

    def __init__(self, proc: subprocess.Popen, out: Path, answers: Path, start: float,
                 sample_s: float):
        super().__init__(daemon=True)
        self.proc, self.out, self.answers, self.start_t = proc, out, answers, start
        self.sample_s = sample_s
        self.seen = {name: 0 for name in _existing(out)}  # earlier runs' files count 0
        self.first_row_s: float | None = None
        self.rows = 0
        self.samples: list[tuple[float, int, int]] = []  # (s, answered, durable)
        self.peaks = {"driver_hwm": 0, "raylet_rss": 0, "raylet_hwm": 0, "object_store": 0}
        self.stop_event = threading.Event()

    def run(self) -> None:
        next_sample = 0.0
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
            self.rows = committed(self.out, self.seen)
            if self.rows and self.first_row_s is None:
                self.first_row_s = now
            if now >= next_sample:
                done = sum(n for _, n in answered(self.answers))
                self.samples.append((round(now, 1), done, self.rows))
                next_sample = now + self.sample_s


def _existing(out: Path) -> list[str]:
    return [p.name for p in out.glob("part-*.parquet")] if out.exists() else []


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the job's process group (it was started in a session of its own), then every
    process it had started, each by id (Ray's own start new sessions)."""
    started = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_job(manifest: Path, out: Path, flags: list[str], *, log: Path, minutes: float | None,
            kill_at_s: float | None, first_row_limit_s: float, sample_s: float,
            instant: bool) -> dict:
    """One run of the job; stopped `minutes` after its first durable row, `kill_at_s` after
    its start, or when nothing was durable within `first_row_limit_s`."""
    tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths
    answers = tmp / "answers"
    answers.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_ADDRESS": "local",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1", ANSWER_LOG_ENV: str(answers),
           "SCALE_BENCH_INSTANT": "1" if instant else "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench")])}
    argv = [sys.executable, str(Path(__file__).resolve()), "_job", "--input", str(manifest),
            "--output", str(out), *flags]
    start = time.monotonic()
    wall_start = time.time()
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    watch = Watch(proc, out, answers, start, sample_s)
    watch.start()
    before = len(watch.seen)
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            now = time.monotonic() - start
            if kill_at_s is not None and now >= kill_at_s:
                break
            if watch.first_row_s is None and now > first_row_limit_s:
                break
            if (minutes is not None and watch.first_row_s is not None
                    and now > watch.first_row_s + minutes * 60):
                break
    finally:
        finished = proc.poll() is not None
        killed_at = time.time()
        kill_tree(proc)
        watch.stop_event.set()
        watch.join()
    durable = committed(out, watch.seen)  # this run's files (earlier ones count 0)
    batches = answered(answers, until=killed_at)
    shutil.rmtree(tmp, ignore_errors=True)
    rows_answered = sum(n for _, n in batches)
    last_minute = sum(n for t, n in batches if t > killed_at - 60)
    bound = max(2 * BATCH * ACTORS, last_minute)
    ran = time.monotonic() - start
    mb = {k: round(v / 1024**2) for k, v in watch.peaks.items()}
    return {"first_durable_s": watch.first_row_s and round(watch.first_row_s, 1),
            "first_answer_s": batches and round(batches[0][0] - wall_start, 1) or None,
            "rows_answered": rows_answered, "rows_durable": durable,
            "lost": rows_answered - durable, "loss_bound": bound,
            "files_written": len(watch.seen) - before, "ran_s": round(ran, 1),
            "finished": finished, "peak_mb": mb, "samples": watch.samples}


def check_exactly_once(out: Path, earlier: set[str]) -> dict:
    """Ids in the output at most once; how many of them earlier runs had written."""
    ids = pq.read_table(out, columns=["id"]).column("id") if _existing(out) else pa.array([])
    unique = pc.count_distinct(ids).as_py() if len(ids) else 0
    new = set(ids.to_pylist()) - earlier
    return {"rows": len(ids), "distinct_ids": unique, "duplicates": len(ids) - unique,
            "new_ids": len(new)}


def report(name: str, result: dict) -> None:
    peaks = result["peak_mb"]
    series = ", ".join(f"{t:.0f}s {a}/{d}" for t, a, d in result["samples"][::5])
    print(f"{name}: first durable row at {result['first_durable_s']} s (first answer at"
          f" {result['first_answer_s']} s); by {result['ran_s']} s {result['rows_answered']}"
          f" answered, {result['rows_durable']} durable in {result['files_written']} files"
          f" (not durable {result['lost']}, bound {result['loss_bound']}); driver peak"
          f" {peaks['driver_hwm']} MiB, raylet {peaks['raylet_rss']} MiB (+ object store"
          f" pages {peaks['object_store']} MiB)\n  answered/durable: {series}", flush=True)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["_job"]:
        return job_child(sys.argv[2:])
    from model_bench import positive_int, provenance, source_commit, write_json

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000000,10000000",
                   help="comma-separated manifest sizes (default: %(default)s)")
    p.add_argument("--shards", type=positive_int, default=1,
                   help="manifest files per manifest (a folder of shards when > 1)")
    p.add_argument("--layouts", default="separate,in-actors",
                   help="separate (decode in CPU tasks) and/or in-actors (--decode-in-actors)")
    p.add_argument("--model", choices=sorted(MODEL_FLAGS), default="demo",
                   help="demo: the real tiny model in the default actor; instant: a stand-in")
    p.add_argument("--images", type=positive_int, default=300, help="distinct images")
    p.add_argument("--minutes", type=float, default=2.0,
                   help="how long each run goes on after its first durable row (0: stop there)")
    p.add_argument("--first-row-limit", type=float, default=300.0,
                   help="seconds a run may take to write its first row before it is stopped")
    p.add_argument("--sample-s", type=float, default=5.0, help="answered/durable sampling")
    p.add_argument("--kills", default="30,120,300",
                   help="seconds after each run's start at which runs 1, 2, 3 ... of the"
                        " kill-and-rerun series are killed ('none': no series)")
    p.add_argument("--resume-size", type=int, default=1_000_000,
                   help="manifest size of the kill-and-rerun series")
    p.add_argument("--workdir", type=Path, help="where manifests and outputs go (default: a "
                   "temporary folder, removed afterwards)")
    p.add_argument("--out", type=Path, help="JSON file for the results")
    args = p.parse_args(argv)
    try:
        sizes = [int(float(n)) for n in args.sizes.split(",")]
        kills = [] if args.kills == "none" else [float(k) for k in args.kills.split(",")]
    except ValueError:
        p.error(f"--sizes and --kills must be comma-separated numbers, got {args.sizes!r}, "
                f"{args.kills!r}")
    layouts = args.layouts.split(",")
    if set(layouts) - set(LAYOUT_FLAGS):
        p.error(f"--layouts must name {sorted(LAYOUT_FLAGS)}, got {args.layouts!r}")
    if min(sizes) < 1 or args.resume_size < 0 or args.minutes < 0:
        p.error("--sizes must be >= 1, --resume-size >= 0 and --minutes >= 0")
    commit = source_commit()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="scale-bench-"))
    flags = [*MODEL_FLAGS[args.model], *JOB_FLAGS]
    results: dict = {**provenance(commit), "cpus": os.cpu_count(), "flags": flags,
                     "model": args.model, "sizes": {}, "kills": {}}
    common = {"first_row_limit_s": args.first_row_limit, "sample_s": args.sample_s,
              "instant": args.model == "instant"}
    try:
        images = make_images(work / "images", args.images)
        for n in sizes:
            manifest = work / (f"manifest-{n}" + ("" if args.shards > 1 else ".parquet"))
            made = time.monotonic()
            make_manifest(manifest, n, images, args.shards)
            print(f"{n} rows: manifest written in {time.monotonic() - made:.1f} s", flush=True)
            for layout in layouts:
                out = work / f"out-{n}-{layout}"
                result = run_job(manifest, out, flags + LAYOUT_FLAGS[layout],
                                 log=work / f"job-{n}-{layout}.log", minutes=args.minutes,
                                 kill_at_s=None, **common)
                result["exactly_once"] = check_exactly_once(out, set())
                results["sizes"][f"{n} {layout}"] = result
                report(f"{n} rows, {layout}", result)
                write_json(args.out, results)
                shutil.rmtree(out, ignore_errors=True)
            if manifest.is_dir():
                shutil.rmtree(manifest)
            else:
                manifest.unlink()
        if kills:
            results["kills"] = kill_series(work, args, images, flags, kills, common)
            write_json(args.out, results)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def kill_series(work: Path, args, images: list[str], flags: list[str], kills: list[float],
                common: dict) -> dict:
    n = args.resume_size
    manifest = work / f"manifest-{n}.parquet"
    if not manifest.exists():
        make_manifest(manifest, n, images)
    out, runs, written = work / f"kills-{n}", {}, set()
    for i, at in enumerate([*kills, None]):
        name = f"killed at {at:.0f} s" if at is not None else "rerun to its first new row"
        result = run_job(manifest, out, flags, log=work / f"kills-{i}.log",
                         minutes=None if at is not None else 0, kill_at_s=at, **common)
        result["exactly_once"] = check_exactly_once(out, written)
        result["started_at"] = datetime.now().isoformat(timespec="seconds")
        runs[name] = result
        report(f"kill series, run {i + 1} ({name})", result)
        print(f"  exactly once: {result['exactly_once']}", flush=True)
        written = set(pq.read_table(out, columns=["id"]).column("id").to_pylist()) \
            if _existing(out) else set()
    return runs


if __name__ == "__main__":
    sys.exit(main())
