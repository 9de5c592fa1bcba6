"""Listing benchmark: an object-store prefix listed by `pipeline.inputs.find_files` (delimiter
listings of the top levels, then every sub-prefix paginated, `LIST_THREADS` at once) against
one flat paginated listing (`fs.find`), on a moto S3 server on 127.0.0.1.

    python bench/list_bench.py --objects 2000,10000,30000 --prefixes 100

The objects are empty and spread evenly over `--prefixes` sub-prefixes (`tiles/p0042/...`).
Moto answers every page in Python, so its absolute rates are far below S3's; the ratio of the
two ways and the number of requests each makes are what carry over (see bench/RESULTS.md).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def start_moto() -> subprocess.Popen:
    """moto's S3 server on a free 127.0.0.1 port, with this process's AWS_* variables (fake
    credentials, endpoint) pointing at it."""
    from tests.helpers import free_port

    port = free_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    binary = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    import urllib.request

    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def upload(client, bucket: str, keys: list[str]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b""), keys))


def main(argv: list[str] | None = None) -> int:
    from model_bench import (
        batch_list,
        bench_parser,
        positive_int,
        provenance,
        source_commit,
        write_json,
    )

    p = bench_parser(__doc__)
    p.add_argument("--objects", type=batch_list, default="2000,10000",
                   help="comma-separated object counts, listed after each upload")
    p.add_argument("--prefixes", type=positive_int, default=100)
    p.add_argument("--repeats", type=positive_int, default=2)
    args = p.parse_args(argv)
    counts = sorted(args.objects)
    commit = source_commit()

    import boto3
    import s3fs

    from pipeline.inputs import LIST_THREADS, find_files
    moto = start_moto()
    results = {**provenance(commit), "prefixes": args.prefixes, "threads": LIST_THREADS,
               "runs": []}
    try:
        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        client.create_bucket(Bucket="bench")
        uploaded = 0
        for n in counts:
            keys = [f"tiles/p{i % args.prefixes:04d}/tile_{i:08d}.jpg"
                    for i in range(uploaded, n)]
            upload(client, "bench", keys)
            uploaded = n
            fs = s3fs.S3FileSystem()
            timings: dict[str, list[float]] = {"flat": [], "parallel": []}
            for _ in range(args.repeats):
                for name, fn in (("flat", fs.find), ("parallel", functools.partial(find_files, fs))):
                    fs.invalidate_cache()
                    start = time.perf_counter()
                    found = fn("bench/tiles")
                    timings[name].append(time.perf_counter() - start)
                    assert len(found) == n, (name, len(found), n)
            best = {k: min(v) for k, v in timings.items()}
            run = {"objects": n, "seconds": best,
                   "objects_per_s": {k: round(n / v) for k, v in best.items()},
                   "speedup": round(best["flat"] / best["parallel"], 2)}
            results["runs"].append(run)
            print(f"{n} objects over {args.prefixes} prefixes: flat {best['flat']:.2f} s,"
                  f" parallel {best['parallel']:.2f} s ({run['speedup']}x)", flush=True)
            write_json(args.out, results)
    finally:
        os.killpg(moto.pid, signal.SIGKILL)
        moto.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
