"""Which processes a pipeline job's CPU goes to: one job of `pipeline_bench` (same images,
model, running local cluster, 2 actors of 0.5 CPU), then every process that spent CPU during
it with the titles it had (Ray names a worker after its task or actor, `ray::IDLE` between
tasks) and how many processes the job started.

    python bench/worker_census.py --images 384                   # the default, separate layout
    python bench/worker_census.py --images 384 --decode-in-actors
    python bench/worker_census.py --images 384 --code /tmp/old   # another checkout's pipeline

A worker that ran only a task or two and then left is a process Ray started for them (Python,
Ray, pyarrow and the project imported again: 1.5-2 CPU s each on this machine).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--decode-in-actors", action="store_true")
    p.add_argument("--code", type=Path, default=HERE.parent,
                   help="the checkout whose pipeline runs (default: this one)")
    p.add_argument("--min-cpu", type=float, default=0.3,
                   help="list processes that spent at least this many CPU seconds")
    p.add_argument("--out", type=Path, default=None, help="also write the census as JSON")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error(f"--images must be >= 1, got {args.images}")
    code = args.code.resolve()
    if not (code / "pipeline").is_dir():
        p.error(f"--code {args.code}: no pipeline/ package there")
    # this checkout's bench helpers; the job's pipeline from --code, in the driver and in
    # every Ray worker (they inherit PYTHONPATH from the head node started here)
    sys.path[:0] = [str(code), str(HERE)]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(code), *filter(None, [os.environ.get("PYTHONPATH")])])
    import pipeline_bench as pb
    from model_bench import make_images

    sys.path.insert(0, str(code))  # pipeline_bench put this checkout first

    titles: dict[int, set[str]] = collections.defaultdict(set)
    sample = pb.cpu_seconds_by_process

    def sample_with_titles() -> dict[int, tuple[str, float]]:
        seen = sample()
        for pid, (title, _) in seen.items():
            titles[pid].add(title[:80])
        return seen

    pb.cpu_seconds_by_process = sample_with_titles
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, im in enumerate(make_images(args.images, seed=1)):
            im.save(folder / f"img_{i:04d}.jpg", quality=90)
        with pb.running_cluster(os.cpu_count()) as address:
            sampler = pb.CpuSampler()
            sampler.start()
            result = pb.pipeline_run(folder, Path(tmp) / "out", "demo", 8, 2, 0.5, 16,
                                     args.decode_in_actors, address)
            sampler.finish()
    rows = []
    for pid, (_, cpu) in sampler.latest.items():
        spent = cpu - sampler.before.get(pid, ("", 0.0))[1]
        if spent >= args.min_cpu:
            rows.append({"pid": pid, "cpu_s": round(spent, 1),
                         "titles": sorted(t for t in titles[pid] if t)})
    rows.sort(key=lambda r: -r["cpu_s"])
    started = [pid for pid in sampler.latest if pid not in sampler.before]
    print(f"{args.images} images, {'in actors' if args.decode_in_actors else 'separate'},"
          f" code {code}: {result['wall_s']:.1f} s; CPU by group {result['cpu_s']}")
    for r in rows:
        print(f"{r['cpu_s']:6.1f} s  pid {r['pid']}  {', '.join(r['titles'])}")
    print(f"processes started during the job: {len(started)}")
    if args.out:
        args.out.write_text(json.dumps({"images": args.images, "code": str(code),
                                        "decode_in_actors": args.decode_in_actors,
                                        "wall_s": result["wall_s"], "groups": result["cpu_s"],
                                        "processes": rows, "started": len(started)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
