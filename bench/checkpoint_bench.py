"""Resume machinery: `pipeline.resume` + `pipeline.write` against Ray Data's row-level
checkpointing (`ray.data.checkpoint.CheckpointConfig`), on the same cases (issue 23, item 4).

    python bench/checkpoint_bench.py --out bench/results/checkpoint.json

Both sides run the same stand-in for decode + model, in a child process that starts its own
local Ray (`ray.init(num_cpus=2)` for ours, 3 for Ray Data's: see `RAY_CPUS`), so that a kill
takes the whole job (driver, raylet, GCS, workers: the process group and every descendant,
SIGKILL):

- ours: the manifest put in blocks, `prepare_output` (stale temporaries, quarantine),
  `DoneKeys.collect` and `drop_done_blocks` (tasks keyed by `id`) or `drop_written` after the
  expansion (keys `id` + `page`, `id` + `chip_row` + `chip_col`), the stand-in, and
  `ParquetSink` (`rows_per_file`) with `write_datasink`, as `pipeline.run.run` does;
- Ray Data: `DataContext.checkpoint_config = CheckpointConfig(id_column, checkpoint_path)`,
  `ray.data.read_parquet(manifest)` -> the same expansion and stand-in ->
  `write_parquet(min_rows_per_file=...)`, as Ray Data requires (a read first, a file write
  last).

Cases (each side, the same manifest, rows per file and stand-in):
1. exactly once after SIGKILL: killed once half of the rows are durable, rerun to the end,
   each key counted in the readable output (Ray Data's rerun is first tried on 2 CPUs, as ours
   runs, and stopped after `--hang-check` seconds); then a third run of the same command after
   that success (Ray Data's default `delete_checkpoint_on_success=True`);
2. composite keys: OCR pages (`id` + `page`, 1-4 pages a document) and chips (`id` +
   `chip_row` + `chip_col`, 2 x 1-3 a tile), made after the read as decode makes them; Ray
   Data with `id_column="id"`, with a derived string key made after the expansion, and with
   the derived key in a manifest already expanded to one row per page (the workaround);
3. corrupt files: half the manifest run to the end, one committed output file (or, for Ray
   Data, one committed checkpoint file) truncated to half its bytes, then the full manifest;
4. object storage: case 1 with output (and checkpoint) on s3:// on a moto server on
   127.0.0.1;
5. start-up at 1e6 written rows: an output (ours: 2,000 files of 500 rows, as the job writes
   them; Ray Data: 2,000 checkpoint files of 500 ids, its committed format, which is all that
   it reads back) and a manifest of those rows plus `--startup-new` new ones; the time from
   spawning the job's process to the stand-in's first new row, and to the end.

What the stand-in leaves out (a stand-in must not hide what users hit): image decoding (CPU
tasks whose long blocks starve the write on small machines, issue 23 item 1), the model's load
time and memory, GPUs, error rows (a document that cannot be opened gives one row with a null
`page`: a derived string key must then encode the null), and real answer sizes (here a short
string; real rows carry lists and are larger, so files are larger and slower to read back).
The expansion into pages and chips is a pure function of the id, where real decode opens the
document: that is the cost the manifest-expansion workaround moves into listing and is not
measured here. The stand-in model sleeps `--sleep-ms` per row on one 1-CPU actor; rows per
file are small so that a case has many files in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

BATCH = 8  # rows per stand-in call
KEYS = {"id": ("id",), "ocr": ("id", "page"), "chips": ("id", "chip_row", "chip_col")}
TASKS = {"id": "caption", "ocr": "ocr", "chips": "chips"}
EXTRA = {"id": (), "ocr": (pa.field("page", pa.int32()),),
         "chips": (pa.field("chip_row", pa.int32()), pa.field("chip_col", pa.int32()))}
PREWRITTEN_ROWS_PER_FILE = 500
# Ray's logical CPUs. Ours: 2, this machine's cores. Ray Data's checkpointing: 3, because its
# CheckpointFilter actor takes 1 CPU (not settable from CheckpointConfig) and, beside the 1-CPU
# model actor, 2 CPUs leave none for the read task: the resumed job hangs (measured in case 1).
OUR_CPUS, RAY_CPUS = 2, 3


# ---------------------------------------------------------------- the shared stand-ins

def _crc(ids: list[str]) -> np.ndarray:
    return np.array([zlib.crc32(i.encode()) for i in ids], dtype=np.int64)


def expand(batch: pa.Table, kind: str) -> pa.Table:
    """One row per page (ocr: 1-4 a document) or chip (chips: 2 rows x 1-3 cols a tile), a
    pure function of the id (real decode opens the file to know). Both sides then cut the
    rows into 8-row blocks: this stands in for Ray Data splitting decode's output blocks by
    size (a decoded 1024 px page is 3 MiB, a block at most 128 MiB, about 40 pages), which
    puts the pages of one document into several blocks, and so several files."""
    ids = batch.column("id").to_pylist()
    crc = _crc(ids)
    if kind == "ocr":
        counts = 1 + crc % 4
        index = np.repeat(np.arange(len(ids)), counts)
        page = np.concatenate([np.arange(n) for n in counts]) if len(ids) else np.array([])
        out = batch.take(pa.array(index, pa.int64()))
        return out.append_column("page", pa.array(page, pa.int32()))
    cols = 1 + crc % 3
    counts = 2 * cols
    index = np.repeat(np.arange(len(ids)), counts)
    rows = np.concatenate([np.repeat(np.arange(2), c) for c in cols]) if len(ids) else []
    colv = np.concatenate([np.tile(np.arange(c), 2) for c in cols]) if len(ids) else []
    out = batch.take(pa.array(index, pa.int64()))
    out = out.append_column("chip_row", pa.array(rows, pa.int32()))
    return out.append_column("chip_col", pa.array(colv, pa.int32()))


def derive_key(batch: pa.Table, kind: str) -> pa.Table:
    """The composite key as one string column `key` (`id#page`, `id#row#col`)."""
    parts = [batch.column(c).cast(pa.string()) for c in KEYS[kind]]
    return batch.append_column("key", pc.binary_join_element_wise(*parts, "#"))


class StandIn:
    """The model stand-in: sleeps `sleep_s` a row and answers; the first call stamps
    `marker` with the wall time (start-up case)."""

    def __init__(self, sleep_s: float, task: str, marker: str | None = None):
        self.sleep_s, self.task, self.marker = sleep_s, task, marker

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.marker and batch.num_rows:
            tmp = f"{self.marker}.{os.getpid()}"
            Path(tmp).write_text(repr(time.time()))
            os.replace(tmp, self.marker)
            self.marker = None
        time.sleep(self.sleep_s * batch.num_rows)
        n = batch.num_rows
        batch = batch.append_column("answer", pa.array(["a stand-in answer"] * n, pa.string()))
        if "source_uri" not in batch.column_names:
            batch = batch.append_column("source_uri", batch.column("id"))
        return batch.append_column("task", pa.array([self.task] * n, pa.string()))


# ---------------------------------------------------------------- child: one job

def child(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=("ours", "ray"), required=True)
    p.add_argument("--kind", choices=tuple(KEYS), default="id")
    p.add_argument("--manifest", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--ckpt")
    p.add_argument("--id-column", default="id")
    p.add_argument("--derive", action="store_true", help="ray: key column made after expand")
    p.add_argument("--pre-expanded", action="store_true", help="manifest already expanded")
    p.add_argument("--keep-ckpt", action="store_true")
    p.add_argument("--rows-per-file", type=int, default=50)
    p.add_argument("--sleep-ms", type=float, default=4.0)
    p.add_argument("--marker")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    result: dict = {"pid": os.getpid()}

    def save() -> None:
        Path(a.result).write_text(json.dumps(result))

    import ray

    try:
        ray.init(address="local", num_cpus=a.cpus, include_dashboard=False,
                 log_to_driver=False)
        result["ray_up"] = time.time()
        save()
        standin = {"fn_constructor_kwargs": {"sleep_s": a.sleep_ms / 1000,
                                             "task": TASKS[a.kind], "marker": a.marker},
                   "batch_size": BATCH, "concurrency": 1, "num_cpus": 1,
                   "batch_format": "pyarrow"}
        (run_ours if a.side == "ours" else run_ray)(a, standin, result)
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - the outcome is the measurement
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"[:600]
    finally:
        result["end"] = time.time()
        save()
        ray.shutdown()
    return 0


def run_ours(a, standin: dict, result: dict) -> None:
    import ray

    from pipeline.columns import output_schema
    from pipeline.inputs import LISTING_BLOCK_ROWS
    from pipeline.resume import DoneKeys, drop_done_blocks, drop_written, prepare_output
    from pipeline.run import cut_table
    from pipeline.write import ParquetSink

    keys, task = KEYS[a.kind], TASKS[a.kind]
    prepare_output(a.output, overwrite=False)
    manifest = pq.read_table(a.manifest, columns=["id"])
    blocks = [ray.put(t) for t in cut_table(manifest, LISTING_BLOCK_ROWS)]
    listed = manifest.num_rows
    del manifest
    done = DoneKeys.collect(a.output, keys, task)
    to_run = listed
    if keys == ("id",):
        blocks, to_run = drop_done_blocks(blocks, listed, done)
    result["planned"] = time.time()
    result["done_keys"], result["to_run"] = done.rows, to_run
    if not to_run:
        return
    if to_run <= LISTING_BLOCK_ROWS:
        ds = ray.data.from_blocks([t for ref in blocks for t in cut_table(ray.get(ref), 8)])
    else:
        ds = ray.data.from_arrow_refs(blocks)
    if a.kind != "id":
        ds = ds.map_batches(expand, fn_kwargs={"kind": a.kind}, batch_format="pyarrow")
        ds = ds.repartition(target_num_rows_per_block=BATCH)  # see `expand`
        if done.ref is not None:
            ds = ds.map_batches(drop_written, fn_kwargs={"done": done.ref, "key_columns": keys},
                                batch_format="pyarrow")
    ds = ds.map_batches(StandIn, **standin)
    sink = ParquetSink(a.output, output_schema(EXTRA[a.kind]), keys,
                       rows_per_file=a.rows_per_file)
    ds.write_datasink(sink, concurrency=1, ray_remote_args={"num_cpus": 0.25})


def run_ray(a, standin: dict, result: dict) -> None:
    import ray
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    DataContext.get_current().checkpoint_config = CheckpointConfig(
        id_column=a.id_column, checkpoint_path=a.ckpt,
        delete_checkpoint_on_success=not a.keep_ckpt)
    # 8-row blocks, as our side's (`pipeline.run` cuts small jobs into decode-sized blocks):
    # one manifest file is one read task, and the stand-in's batches of a task leave it as one
    # block, so without this every row would reach the write (and the checkpoint) at the end.
    ds = ray.data.read_parquet(a.manifest).repartition(target_num_rows_per_block=BATCH)
    if a.kind != "id" and not a.pre_expanded:
        ds = ds.map_batches(expand, fn_kwargs={"kind": a.kind}, batch_format="pyarrow")
        ds = ds.repartition(target_num_rows_per_block=BATCH)  # see `expand`
    if a.derive:
        ds = ds.map_batches(derive_key, fn_kwargs={"kind": a.kind}, batch_format="pyarrow")
    ds = ds.map_batches(StandIn, **standin)
    ds.write_parquet(a.output, min_rows_per_file=a.rows_per_file, concurrency=1,
                     ray_remote_args={"num_cpus": 0.25})


# ---------------------------------------------------------------- parent: storage helpers

def _fs(uri: str):
    from pipeline.storage import open_fs

    fs, root = open_fs(uri)
    fs.invalidate_cache()
    return fs, root


def _ls(uri: str) -> list[str]:
    fs, root = _fs(uri)
    try:
        return sorted(fs.ls(root, detail=False)) if fs.exists(root) else []
    except FileNotFoundError:
        return []


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def output_files(uri: str, side: str) -> list[str]:
    """The files a reader of the output takes for data: ours `part-*.parquet`, Ray Data's
    every visible `*.parquet`."""
    return [p for p in _ls(uri) if _base(p).endswith(".parquet")
            and not _base(p).startswith((".", "_"))
            and (side == "ray" or _base(p).startswith("part-"))]


def ckpt_files(uri: str, pending: bool = False) -> list[str]:
    return [p for p in _ls(uri) if _base(p).endswith(".parquet")
            and _base(p).endswith(".pending.parquet") == pending]


def _rows(fs, path: str, cache: dict) -> int:
    if path not in cache:
        try:
            with fs.open(path, "rb") as f:
                cache[path] = pq.read_metadata(f).num_rows
        except Exception:  # noqa: BLE001 - being written
            return 0
    return cache[path]


def durable_rows(side: str, output: str, ckpt: str | None, cache: dict) -> int:
    """Rows the job has made durable: ours, the rows of committed output files; Ray Data,
    the ids in committed checkpoint files (what its rerun skips)."""
    if side == "ours":
        files, (fs, _) = output_files(output, side), _fs(output)
    else:
        files, (fs, _) = ckpt_files(ckpt), _fs(ckpt)
    return sum(_rows(fs, p, cache) for p in files)


def check_output(side: str, output: str, kind: str, expected: pa.Table) -> dict:
    """Each expected key counted in the readable output files: duplicates, missing."""
    keys = list(KEYS[kind])
    fs, _ = _fs(output)
    counts: Counter = Counter()
    rows, unreadable, files = 0, [], output_files(output, side)
    for path in files:
        try:
            with fs.open(path, "rb") as f:
                t = pq.read_table(f, columns=keys)
        except Exception:  # noqa: BLE001
            unreadable.append(_base(path))
            continue
        rows += t.num_rows
        counts.update(zip(*(t.column(c).to_pylist() for c in keys)))
    want = set(zip(*(expected.column(c).to_pylist() for c in keys)))
    return {"rows": rows, "expected_keys": len(want),
            "missing": sum(1 for k in want if not counts[k]),
            "duplicate_rows": sum(n - 1 for n in counts.values() if n > 1),
            "unexpected_keys": sum(1 for k in counts if k not in want),
            "files": len(files), "unreadable_files": unreadable}


# ---------------------------------------------------------------- parent: running a job

def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the job's process group, then every process it started, each by id."""
    from scale_bench import kill_tree

    kill_tree(proc)


class Runner:
    def __init__(self, work: Path, env: dict, sleep_ms: float, rows_per_file: int,
                 timeout_s: float):
        self.work, self.env, self.n = work, env, 0
        self.sleep_ms, self.rows_per_file, self.timeout_s = sleep_ms, rows_per_file, timeout_s

    def job(self, side: str, kind: str, manifest: Path, output: str, ckpt: str | None = None,
            kill_at: int | None = None, extra: tuple[str, ...] = (), marker: bool = False,
            rows_per_file: int | None = None, cpus: int | None = None,
            timeout_s: float | None = None) -> dict:
        """One run; SIGKILLed once `kill_at` rows are durable. Returns its timings and how
        it ended."""
        self.n += 1
        tmp = Path(tempfile.mkdtemp(prefix="ck", dir="/tmp"))  # short: Ray's socket paths
        res = self.work / f"job{self.n}.json"
        mark = self.work / f"job{self.n}.mark"
        argv = [sys.executable, str(Path(__file__).resolve()), "_child", "--side", side,
                "--kind", kind, "--manifest", str(manifest), "--output", output,
                "--rows-per-file", str(rows_per_file or self.rows_per_file),
                "--sleep-ms", str(self.sleep_ms), "--result", str(res), *extra,
                "--cpus", str(cpus or (RAY_CPUS if side == "ray" else OUR_CPUS))]
        if ckpt:
            argv += ["--ckpt", ckpt]
        if marker:
            argv += ["--marker", str(mark)]
        env = {**self.env, "RAY_TMPDIR": str(tmp)}
        start = time.time()
        with open(self.work / f"job{self.n}.log", "wb") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        cache: dict = {}
        killed_at = None
        try:
            while proc.poll() is None:
                time.sleep(0.3)
                if time.time() - start > (timeout_s or self.timeout_s):
                    killed_at = "timeout"
                    break
                if kill_at is not None and durable_rows(side, output, ckpt, cache) >= kill_at:
                    killed_at = durable_rows(side, output, ckpt, cache)
                    break
        finally:
            kill_job(proc)
            shutil.rmtree(tmp, ignore_errors=True)
        out = json.loads(res.read_text()) if res.exists() else {}
        info = {"side": side, "cpus": cpus or (RAY_CPUS if side == "ray" else OUR_CPUS),
                "killed_at_rows": killed_at, "wall_s": round(time.time() - start, 2),
                "ok": out.get("ok") if killed_at is None else None}
        if out.get("ray_up"):
            info["ray_init_s"] = round(out["ray_up"] - start, 2)
        if out.get("planned"):
            info["to_plan_s"] = round(out["planned"] - start, 2)
        if mark.exists():
            info["first_new_row_s"] = round(float(mark.read_text()) - start, 2)
        for key in ("error", "done_keys", "to_run"):
            if key in out:
                info[key] = out[key]
        print(f"  {side} {kind} {Path(output).name}: {info}", flush=True)
        return info


# ---------------------------------------------------------------- the cases

def make_manifest(path: Path, ids: list[str] | pa.Array, extra: dict | None = None) -> None:
    table = pa.table({"id": pa.array(ids, pa.string()), **(extra or {})})
    pq.write_table(table, path)


def expected_keys(manifest: Path, kind: str) -> pa.Table:
    table = pq.read_table(manifest)
    if kind != "id" and not set(KEYS[kind]) <= set(table.column_names):
        table = expand(table.select(["id"]), kind)
    return table.select(list(KEYS[kind]))


def truncate(uri: str) -> str:
    """Cut a committed local file to half its bytes (a torn copy, a full disk)."""
    size = os.path.getsize(uri)
    with open(uri, "r+b") as f:
        f.truncate(size // 2)
    return _base(uri)


def kill_and_rerun(r: Runner, side: str, kind: str, manifest: Path, output: str,
                   ckpt: str | None, extra: tuple[str, ...] = (),
                   third_run: bool = False, derived_from: Path | None = None,
                   hang_check: float | None = None) -> dict:
    expected = expected_keys(manifest, kind)
    half = expected.num_rows // 2
    out = {"killed": r.job(side, kind, manifest, output, ckpt, kill_at=half, extra=extra)}
    out["after_kill"] = check_output(side, output, kind, expected)
    if side == "ray" and hang_check:
        # the rerun on 2 CPUs, as ours runs: stopped (SIGKILL) after `hang_check` seconds
        out["rerun_2_cpus"] = r.job(side, kind, manifest, output, ckpt, extra=extra, cpus=2,
                                    timeout_s=hang_check)
        out["after_rerun_2_cpus"] = check_output(side, output, kind, expected)
    out["docs_split_across_files"] = split_docs(side, output) if kind != "id" else None
    out["partial_ids_after_kill"] = partial_ids(side, output, expected) if kind != "id" else None
    if derived_from is not None:
        # The same `id#page` keys made after the expansion instead (the manifest holds only
        # documents), resumed from a copy of this checkpoint: the filter runs at the read.
        copy = f"{ckpt}-copy"
        shutil.copytree(ckpt, copy)
        out["derived_after_expand_rerun"] = r.job(
            side, kind, derived_from, f"{output}-derived", copy,
            extra=("--derive", "--id-column", "key"))
    out["rerun"] = r.job(side, kind, manifest, output, ckpt, extra=extra)
    out["after_rerun"] = check_output(side, output, kind, expected)
    if third_run:
        out["run_after_success"] = r.job(side, kind, manifest, output, ckpt, extra=extra)
        out["after_run_after_success"] = check_output(side, output, kind, expected)
    return out


def partial_ids(side: str, output: str, expected: pa.Table) -> dict:
    """Ids with some but not all of their rows durable: keyed by `id` alone, a rerun skips
    their other rows for good."""
    fs, _ = _fs(output)
    got: Counter = Counter()
    for path in output_files(output, side):
        try:
            with fs.open(path, "rb") as f:
                got.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
        except Exception:  # noqa: BLE001
            continue
    want = Counter(expected.column("id").to_pylist())
    partial = [i for i, n in got.items() if n < want[i]]
    return {"ids": len(partial), "rows_not_durable": sum(want[i] - got[i] for i in partial)}


def split_docs(side: str, output: str) -> int:
    """Ids whose rows sit in more than one readable output file (their other rows are at risk
    when only the id is the key)."""
    fs, _ = _fs(output)
    seen: dict[str, int] = {}
    for path in output_files(output, side):
        try:
            with fs.open(path, "rb") as f:
                ids = set(pq.read_table(f, columns=["id"]).column("id").to_pylist())
        except Exception:  # noqa: BLE001
            continue
        for i in ids:
            seen[i] = seen.get(i, 0) + 1
    return sum(1 for n in seen.values() if n > 1)


def corrupt_case(r: Runner, side: str, work: Path, full: Path, half: Path, where: str) -> dict:
    """Half the manifest to the end, one committed file cut, then the full manifest."""
    name = f"{side}-corrupt-{where}"
    output, ckpt = str(work / f"{name}-out"), str(work / f"{name}-ckpt")
    extra = ("--keep-ckpt",) if side == "ray" else ()
    out = {"first": r.job(side, "id", half, output, ckpt, extra=extra)}
    target = (output_files(output, side) if where == "output" else ckpt_files(ckpt))[0]
    out["truncated"] = truncate(target)
    expected = expected_keys(full, "id")
    out["rerun"] = r.job(side, "id", full, output, ckpt, extra=extra)
    out["after_rerun"] = check_output(side, output, "id", expected)
    if side == "ray" and where == "checkpoint" and not out["rerun"].get("ok"):
        # what a user would do next: delete the damaged checkpoint file and run again
        os.remove(target)
        out["after_deleting_it"] = r.job(side, "id", full, output, ckpt, extra=extra)
        out["after_deleting_it_check"] = check_output(side, output, "id", expected)
    return out


def prewrite(work: Path, rows: int, new: int) -> tuple[Path, str, str, dict]:
    """A manifest of `rows` done ids + `new` new ones; ours: the done rows as the job's own
    files (`pipeline.write.write_table`, 500 rows a file); Ray Data: its committed checkpoint
    files (one `id` column, 500 a file)."""
    from pipeline.columns import conform, output_schema
    from pipeline.write import part_name, write_table

    index = pa.array(np.arange(rows + new))
    ids = pc.binary_join_element_wise(
        "tile/", pc.utf8_lpad(index.cast(pa.string()), 10, "0"), ".jpg", "")
    manifest = work / "startup-manifest.parquet"
    make_manifest(manifest, ids)
    ours, ckpt = work / "startup-ours-out", work / "startup-ray-ckpt"
    ckpt.mkdir()
    schema = output_schema()
    done = ids.slice(0, rows)
    t0 = time.monotonic()
    table = pa.table({"id": done, "source_uri": done, "task": pa.repeat("caption", rows),
                      "answer": pa.repeat("prewritten", rows)})
    for start in range(0, rows, PREWRITTEN_ROWS_PER_FILE):
        part = conform(table.slice(start, PREWRITTEN_ROWS_PER_FILE), schema)
        write_table(part, str(ours), part_name(part, ("id",)))
    t1 = time.monotonic()
    for n, start in enumerate(range(0, rows, PREWRITTEN_ROWS_PER_FILE)):
        pq.write_table(pa.table({"id": done.slice(start, PREWRITTEN_ROWS_PER_FILE)}),
                       ckpt / f"prewritten_{n:06d}.parquet")
    t2 = time.monotonic()
    return manifest, str(ours), str(ckpt), {"ours_write_s": round(t1 - t0, 1),
                                             "ray_ckpt_write_s": round(t2 - t1, 1)}


def startup_case(r: Runner, work: Path, rows: int, new: int) -> dict:
    manifest, ours, ckpt, made = prewrite(work, rows, new)
    print(f"start-up: {rows} rows pre-written {made}", flush=True)
    expected = pa.table({"id": pq.read_table(manifest, columns=["id"]).column("id")
                         .slice(rows)})
    out = {"prewritten_rows": rows, "new_rows": new, "prewrite": made}
    out["ours"] = r.job("ours", "id", manifest, ours, marker=True)
    out["ours_check"] = check_new(ours, "ours", expected)
    ray_out = str(work / "startup-ray-out")
    out["ray"] = r.job("ray", "id", manifest, ray_out, ckpt, marker=True,
                       extra=("--keep-ckpt",))
    out["ray_check"] = check_new(ray_out, "ray", expected)
    return out


def check_new(output: str, side: str, expected_new: pa.Table) -> dict:
    """Rows written with answer != 'prewritten': each new id once, no done id again."""
    fs, _ = _fs(output)
    tables = []
    for path in output_files(output, side):
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=["id", "answer"])
        tables.append(t.filter(pc.not_equal(t.column("answer"), "prewritten")))
    got = pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string())})
    ids = got.column("id")
    new = set(expected_new.column("id").to_pylist())
    seen = ids.to_pylist()
    return {"rows_written_this_run": len(seen), "distinct": len(set(seen)),
            "done_ids_run_again": sum(1 for i in seen if i not in new),
            "new_missing": len(new - set(seen))}


def start_moto(env: dict) -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    from tests.helpers import free_port

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    env.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                           "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ckpt-bench")
    return server, "s3://ckpt-bench"


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["_child"]:
        return child(sys.argv[2:])
    from model_bench import provenance, source_commit, write_json

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1200, help="manifest rows of cases 1-4")
    p.add_argument("--rows-per-file", type=int, default=50)
    p.add_argument("--sleep-ms", type=float, default=4.0, help="stand-in time per row")
    p.add_argument("--startup-rows", type=int, default=1_000_000,
                   help="rows already written in the start-up case (0: skip it)")
    p.add_argument("--startup-new", type=int, default=1000)
    p.add_argument("--cases", default="exactly_once,composite,corrupt,s3,startup")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds a run may take")
    p.add_argument("--hang-check", type=float, default=120.0,
                   help="seconds the 2-CPU rerun of Ray Data's side may take (case 1)")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--composite", default="ocr,chips,expanded",
                   help="parts of the composite case: ocr, chips, ocr_ours, chips_ray, ..., "
                   "expanded (Ray Data's derived keys)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other cases already in --out (rerun some cases)")
    args = p.parse_args(argv)
    cases = set(args.cases.split(","))
    commit = source_commit()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    token = work / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench")]),
           "RAY_AUTH_TOKEN_PATH": str(token), "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "PYTHONUNBUFFERED": "1",
           # On a shared 2-core machine under load (load average 20 seen) the GCS missed the
           # raylet's heartbeats and declared the only node dead mid-run; be patient.
           "RAY_health_check_failure_threshold": "60", "RAY_health_check_timeout_ms": "30000"}
    env.pop("RAY_ADDRESS", None)
    server, bucket = start_moto(env)
    r = Runner(work, env, args.sleep_ms, args.rows_per_file, args.timeout)
    import ray

    results: dict = {**provenance(commit), "ray": ray.__version__, "cpus": os.cpu_count(),
                     "rows": args.rows, "rows_per_file": args.rows_per_file,
                     "sleep_ms": args.sleep_ms, "our_cpus": OUR_CPUS, "ray_cpus": RAY_CPUS,
                     "cases": {}}
    if args.merge and args.out and args.out.exists():
        results["cases"] = json.loads(args.out.read_text())["cases"]
    ids = [f"doc/{i:07d}" for i in range(args.rows)]
    full, half = work / "manifest.parquet", work / "manifest-half.parquet"
    make_manifest(full, ids)
    make_manifest(half, ids[: args.rows // 2])
    res = results["cases"]
    try:
        if "exactly_once" in cases:
            print("case: exactly once after SIGKILL", flush=True)
            res["exactly_once"] = {side: kill_and_rerun(
                r, side, "id", full, str(work / f"{side}-eo-out"), str(work / f"{side}-eo-ckpt"),
                third_run=True, hang_check=args.hang_check) for side in ("ours", "ray")}
            write_json(args.out, results)
        if "composite" in cases:
            print("case: composite keys", flush=True)
            comp: dict = dict(res.get("composite", {}))
            parts = set(args.composite.split(","))
            for kind in ("ocr", "chips"):
                for side in ("ours", "ray"):
                    if f"{kind}_{side}" not in parts and kind not in parts:
                        continue
                    comp[f"{kind}_{side}"] = kill_and_rerun(
                        r, side, kind, full, str(work / f"{side}-{kind}-out"),
                        str(work / f"{side}-{kind}-ckpt"))
            if "expanded" in parts:
                flat = work / "manifest-ocr-expanded.parquet"
                expanded = derive_key(expand(pq.read_table(full), "ocr"), "ocr")
                pq.write_table(expanded, flat)
                comp["ocr_ray_expanded_manifest"] = kill_and_rerun(
                    r, "ray", "ocr", flat, str(work / "ray-ocr-flat-out"),
                    str(work / "ray-ocr-flat-ckpt"),
                    extra=("--pre-expanded", "--id-column", "key"), derived_from=full)
                comp["ocr_ray_expanded_manifest"]["manifest_rows"] = expanded.num_rows
                comp["ocr_ray_expanded_manifest"]["documents"] = len(ids)
            res["composite"] = comp
            write_json(args.out, results)
        if "corrupt" in cases:
            print("case: corrupt files", flush=True)
            res["corrupt"] = {
                "ours_output": corrupt_case(r, "ours", work, full, half, "output"),
                "ray_output": corrupt_case(r, "ray", work, full, half, "output"),
                "ray_checkpoint": corrupt_case(r, "ray", work, full, half, "checkpoint"),
            }
            write_json(args.out, results)
        if "s3" in cases:
            print("case: object storage (moto)", flush=True)
            res["s3"] = {side: kill_and_rerun(
                r, side, "id", full, f"{bucket}/{side}-out", f"{bucket}/{side}-ckpt")
                for side in ("ours", "ray")}
            write_json(args.out, results)
        if "startup" in cases and args.startup_rows:
            print("case: start-up at pre-written rows", flush=True)
            res["startup"] = startup_case(r, work, args.startup_rows, args.startup_new)
            write_json(args.out, results)
    finally:
        server.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
