"""Pipeline benchmark: the Ray Data job end to end against a bare loop that calls the same model
on the same images, already decoded.

    python bench/pipeline_bench.py                       # tiny demo model, local Ray, CPU
    python bench/pipeline_bench.py --images 192,384,768  # several job sizes, one after another

Each size runs the pipeline in both layouts (`--layouts`): `separate`, the default, decodes in
CPU tasks beside the actors; `in-actors` (`--decode-in-actors`) decodes inside the model actors.
The pipeline's figure is the whole run (listing, decoding, actor start-up and model load,
generation, Parquet writes) from the run summary. The bare loop is what a plain script does
with the same model and the pipeline's own decode code: read and decode each batch, then
generate, one after the other, model already loaded; its generation-only rate is reported too.
It runs in a fresh process twice: `plain` (glibc's allocator defaults) and `keep-freed` (with
`pipeline.predict.keep_freed_memory()`, as the predict actors on CPU). Each gets the whole
machine.

Where the pipeline runs (`--cluster`):
- `running` (the default): as a job on a running local cluster, the way `ray job submit` finds
  one, each job with a driver process of its own. Each round starts a head node
  (`ray start --head`), runs an untimed 8-image job on it (a long-lived cluster has run jobs
  before: Ray Data's helper actors, which are detached, exist by then, and the head's own
  processes have finished starting), then the timed jobs, then stops the head, so the bare
  loops run with no Ray on the machine.
- `fresh`: Ray started inside the bench's process for every pipeline run (`ray.init()`), so
  each figure also pays for starting Ray Data's helper actors and for what Ray's processes
  still do just after they start.

This machine's speed drifts from minute to minute (the same 192-image pipeline run took 36.9
and 44.7 s within the hour), so `--repeats N` runs every variant N times, interleaved: each
round runs the pipelines and the bare loops once, the pipelines first in rounds 1, 3, ... and
the bare loops first in rounds 2, 4, ..., so a slow spell weighs on both sides alike. The
ratios are per round; the summary gives their median and range (the JSON's `round` counts
from 0).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


BARE_LOOPS = {"plain": False, "keep-freed": True}  # name -> keep_freed_memory() first


def bare_loop(folder: Path, model_path: str, batch: int, new_tokens: int,
              keep_freed: bool) -> dict:
    import torch
    from PIL import Image

    from flexattn import llava_v1_prompt, load_model
    from pipeline.decode import DecodeConfig, open_image, prepare
    from pipeline.predict import keep_freed_memory

    if keep_freed:
        assert keep_freed_memory(), "keep_freed_memory() needs glibc"

    config = DecodeConfig()
    paths = sorted(folder.iterdir())
    model = load_model(model_path, device="cpu")
    prompt = llava_v1_prompt("Describe this remote sensing image in detail.")
    decode_s = generate_s = 0.0
    cpu_start, steal_start = time.process_time(), stolen_seconds()
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            t0 = time.perf_counter()
            chunk = []
            for p in paths[i:i + batch]:
                arr, w, h = prepare(open_image(p.read_bytes(), config.max_pixels), config)
                chunk.append((Image.fromarray(arr), (w, h)))
            t1 = time.perf_counter()
            model.generate([c[0] for c in chunk], [prompt] * len(chunk),
                           max_new_tokens=new_tokens, image_sizes=[c[1] for c in chunk])
            decode_s += t1 - t0
            generate_s += time.perf_counter() - t1
    wall = decode_s + generate_s
    return {"images": len(paths), "wall_s": wall, "images_per_s": len(paths) / wall,
            "cpu_s": round(time.process_time() - cpu_start, 1),
            "stolen_s": round(stolen_seconds() - steal_start, 1),
            "decode_s": decode_s, "generate_s": generate_s,
            "generate_only_images_per_s": len(paths) / generate_s,
            "torch_threads": torch.get_num_threads(), "keep_freed_memory": keep_freed}


def in_fresh_process(fn, *args) -> dict:
    """`fn(*args)` in a new interpreter, as a script of its own would run: nothing this
    process allocated or imported before (Ray's driver, the images) shapes its heap, and it
    reads the environment as it is now."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def stolen_seconds() -> float:
    """CPU seconds the hypervisor has given to others while this machine's CPUs wanted to
    run (steal time, all CPUs, since boot; 0 where /proc/stat has none). On a shared virtual
    machine this is what makes the same run take 26 s or 38 s; each figure records it."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (process title, user + system CPU seconds so far), from /proc (Linux only;
    empty elsewhere). Ray names its workers ``ray::<actor or task>``."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            title = argv0.decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(pid)] = (title, (int(fields[11]) + int(fields[12])) / tick)
    return out


class CpuSampler(threading.Thread):
    """Samples every process's CPU seconds twice a second, so processes that exit before the
    run ends (Ray Data stops its actors as soon as they are done) are still counted, up to
    their last half second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.before = cpu_seconds_by_process()
        self.latest = dict(self.before)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.5):
            self.latest.update(cpu_seconds_by_process())

    def finish(self) -> dict[str, float]:
        self._stop_event.set()
        self.join()
        self.latest.update(cpu_seconds_by_process())
        return cpu_breakdown(self.before, self.latest)


def cpu_breakdown(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two snapshots, grouped: the model actors, the decode workers,
    the driver, Ray's own processes and anything else."""
    groups: dict[str, float] = {}
    for pid, (title, cpu) in after.items():
        spent = cpu - before.get(pid, ("", 0.0))[1]
        if spent <= 0:
            continue
        if "Predictor" in title:
            group = "model actors"
        elif title.startswith("ray::IDLE") or "decode" in title:
            group = "decode workers (ray::IDLE between tasks)"
        elif pid == os.getpid():
            group = "driver"
        elif title.startswith("ray::") or "/ray/" in title:
            group = "Ray processes (raylet, GCS, Ray Data's actors)"
        else:
            group = "other"
        groups[group] = groups.get(group, 0.0) + spent
    return {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}


LAYOUTS = {"separate": False, "in-actors": True}  # name -> JobConfig.decode_in_actors
CLUSTERS = ("running", "fresh")
WARM_UP_IMAGES = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_cluster(cpus: int) -> Iterator[str]:
    """A local head node (`ray start --head --block`, in its own process group) for the
    duration; yields its GCS address. Stopped, with everything it started, on exit."""
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        ray_cli = Path(shutil.which("ray") or "ray")
    port = _free_port()
    temp_dir = Path(os.path.realpath(tempfile.gettempdir())) / f"pb{uuid.uuid4().hex[:6]}"
    # Token auth with Ray's default token, as `ray.init()` starts a local cluster; a job that
    # names the address turns it on only when told.
    auth = {"RAY_AUTH_MODE": "token"}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | auth
    saved = {k: os.environ.get(k) for k in auth}
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block",
         f"--port={port}", f"--num-cpus={cpus}", "--include-dashboard=false",
         f"--temp-dir={temp_dir}", f"--ray-client-server-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:  # the GCS listens first; ray.init then waits for the raylet
            if head.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {head.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("ray start --head: no GCS after 60 s")
            time.sleep(0.2)
        os.environ.update(auth)  # for the jobs' drivers, started from here
        yield f"127.0.0.1:{port}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def pipeline_run(folder: Path, out: Path, model_path: str, batch: int, actors: int,
                 cpus_per_actor: float, new_tokens: int, decode_in_actors: bool,
                 address: str | None = None) -> dict:
    """One pipeline job over `folder`: a job on the cluster at `address`, or, without one, on
    Ray started in this process for the run."""
    import pyarrow.parquet as pq
    import ray

    from pipeline import JobConfig, run

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        sampler, steal_start = CpuSampler(), stolen_seconds()
        sampler.start()
        summary = run(JobConfig(input=str(folder), output=str(out), model=model_path,
                                batch_size=batch, actors=(actors, actors),
                                cpus_per_actor=cpus_per_actor,
                                max_new_tokens=new_tokens, overwrite=True,
                                decode_in_actors=decode_in_actors))
        cpu = sampler.finish()
        stolen = round(stolen_seconds() - steal_start, 1)
    finally:
        ray.shutdown()
    rows = pq.read_table(out, columns=["id", "error"]).to_pylist()
    assert len(rows) == summary.rows_listed and not any(r["error"] for r in rows), rows[:3]
    return {"images": summary.rows_written, "wall_s": summary.elapsed_s,
            "images_per_s": summary.images_per_s, "actors": actors,
            "cpus_per_actor": cpus_per_actor, "decode_in_actors": decode_in_actors,
            "cluster": "running" if address else "fresh", "cpu_s": cpu, "stolen_s": stolen}


def ratio_summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}


def print_round(pipes: dict, bares: dict, ratios: dict, actors: int) -> None:
    for name, bare in bares.items():
        print(f"  bare loop, {name}: {bare['wall_s']:.1f} s = {bare['images_per_s']:.2f}"
              f" images/s (decode {bare['decode_s']:.1f} s + generate"
              f" {bare['generate_s']:.1f} s; generation alone"
              f" {bare['generate_only_images_per_s']:.2f} images/s; {bare['cpu_s']:.1f} CPU s;"
              f" {bare['stolen_s']:.1f} s stolen)",
              flush=True)
    for name, pipe in pipes.items():
        against = ", ".join(f"{r:.2f} against {b}" for b, r in ratios[name].items())
        print(f"  pipeline, decode {name}: {pipe['wall_s']:.1f} s ="
              f" {pipe['images_per_s']:.2f} images/s ({actors} actors, end to end);"
              f" ratio {against}", flush=True)
        print(f"    CPU seconds: {pipe['cpu_s']} ({sum(pipe['cpu_s'].values()):.1f} of"
              f" {os.cpu_count() * pipe['wall_s']:.1f} available; {pipe['stolen_s']:.1f} s"
              " stolen)", flush=True)


def main(argv: list[str] | None = None) -> int:
    from model_bench import batch_list, bench_parser

    p = bench_parser(__doc__)
    p.add_argument("--images", type=batch_list, default="192",
                   help="comma-separated job sizes, each run end to end (e.g. 192,384,768)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus-per-actor", type=float, default=0.5,
                   help="CPUs each actor holds (Ray gives it that many torch threads, at least"
                        " one); the rest decode")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help=f"comma-separated pipeline layouts to run, of {', '.join(LAYOUTS)}"
                        " (default: all)")
    p.add_argument("--model", help="checkpoint directory (default: the tiny demo model)")
    p.add_argument("--cluster", choices=CLUSTERS, default="running",
                   help="run each pipeline as a job on a running local cluster (the default) or"
                        " on Ray started in this process for that run (see above)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds per job size, pipelines and bare loops interleaved (see above)")
    args = p.parse_args(argv)
    sizes = args.images
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    layouts = args.layouts.split(",")
    if not layouts or any(name not in LAYOUTS for name in layouts):
        p.error(f"--layouts must be a comma-separated list of {', '.join(LAYOUTS)},"
                f" got {args.layouts!r}")
    from model_bench import make_images, provenance, source_commit, write_json

    commit = source_commit()  # read before the run: the figures belong to this tree

    from flexattn.demo_model import demo_model_path

    model_path = args.model or str(demo_model_path())
    runs = []
    for n in sizes:
        rounds = []
        with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
            folder = Path(tmp) / "images"
            folder.mkdir()
            warm_up = Path(tmp) / "warm-up"
            warm_up.mkdir()
            for i, im in enumerate(make_images(n, seed=1)):
                im.save(folder / f"img_{i:04d}.jpg", quality=90)
                if i < WARM_UP_IMAGES:
                    im.save(warm_up / f"img_{i:04d}.jpg", quality=90)
            for r in range(args.repeats):
                def pipes_now(r=r, folder=folder, warm_up=warm_up, tmp=tmp):
                    def one(name, address=None, images=folder, out=f"out-{r}"):
                        job = (images, Path(tmp) / f"{out}-{name}", model_path, args.batch_size,
                               args.actors, args.cpus_per_actor, args.new_tokens,
                               LAYOUTS[name])
                        if address is None:
                            return pipeline_run(*job)
                        # On a running cluster each job has a driver process of its own, as
                        # with `ray job submit`.
                        return in_fresh_process(pipeline_run, *job, address)

                    if args.cluster == "fresh":
                        return {name: one(name) for name in layouts}
                    with running_cluster(os.cpu_count()) as address:
                        one(layouts[0], address, warm_up, f"warm-up-{r}")
                        return {name: one(name, address) for name in layouts}

                def bares_now(folder=folder):
                    return {name: in_fresh_process(bare_loop, folder, model_path, args.batch_size,
                                                             args.new_tokens, keep)
                            for name, keep in BARE_LOOPS.items()}

                if r % 2 == 0:
                    pipes = pipes_now()
                    bares = bares_now()
                else:
                    bares = bares_now()
                    pipes = pipes_now()
                ratios = {name: {bare_name: pipe["images_per_s"] / bare["images_per_s"]
                                 for bare_name, bare in bares.items()}
                          for name, pipe in pipes.items()}
                rounds.append({"round": r, "pipeline_first": r % 2 == 0, "pipeline": pipes,
                               "bare_loop": bares, "ratio": ratios})
                print(f"{n} images, round {r + 1} of {args.repeats}:", flush=True)
                print_round(pipes, bares, ratios, args.actors)
        summary = {name: {bare_name: ratio_summary([rd["ratio"][name][bare_name]
                                                    for rd in rounds])
                          for bare_name in BARE_LOOPS}
                   for name in layouts}
        runs.append({"images": n, "rounds": rounds, "ratio": summary})
        if args.repeats > 1:
            print(f"{n} images, ratio over {args.repeats} rounds (median, min-max):", flush=True)
            for name, against in summary.items():
                print(f"  pipeline, decode {name}: " + ", ".join(
                    f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) against {b}"
                    for b, s in against.items()), flush=True)
    write_json(args.out, {**provenance(commit), "cpus": os.cpu_count(), "cluster": args.cluster,
                          "batch_size": args.batch_size, "new_tokens": args.new_tokens,
                          "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
