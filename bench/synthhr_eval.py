"""SynthHR evaluation of a trained model through the RSVQA job, in the three modes.

    python bench/synthhr_eval.py --model models/synthhr-mini --images 200 --seed 2026 \\
        --out bench/results/synthhr-eval.json

Writes a fresh SynthHR set (``--seed``: never one used in training), answers it with
``jobs/score_rsvqa.py`` once per mode (batch size 1, so a row's ``prefill_ms + decode_ms`` is
that image's own time), then reads the written Parquet back beside the set's manifest and
reports per mode: accuracy per question type, how often the 9x9 cell at the named box's centre
was among the cells used (``hr_cells``), the mean ``hr_selected_frac``, the 336 tiles encoded
(with lazy tiles: the tiles holding a used cell), ms and analytical TFLOPs per image, and the
ratios flexattn/lowres and fullres/flexattn. ``--overlays N`` draws the first N answered rows
of the flexattn run (``OUTPUT/_overlays``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model_bench import provenance, source_commit, write_json
from flexattn.options import MODES
from jobs import score_rsvqa
from pipeline.resume import read_output
from synthhr import task as synthhr


def tiles_of(cells: list[bool], zoom: int = 3) -> int:
    """Tiles of the 3x3 grid of 336 tiles holding at least one used 9x9 cell."""
    per = len(cells) ** 0.5 / zoom
    grid = round(len(cells) ** 0.5)
    return len({(int(i // grid // per), int(i % grid // per)) for i, c in enumerate(cells) if c})


def summarize(rows: list[dict], manifest: dict[str, dict]) -> dict:
    """The figures of one mode from its written rows and the set's manifest."""
    out: dict = {}
    for kind in ("pattern", "count"):
        sel = [r for r in rows if r["question_type"] == kind]
        out[f"{kind}_accuracy"] = sum(bool(r["correct"]) for r in sel) / len(sel)
        out[f"{kind}_questions"] = len(sel)
    ok = [r for r in rows if r["error"] is None]
    out["errors"] = len(rows) - len(ok)
    hits = []
    for r in ok:
        q = manifest[r["id"]]
        if q["type"] == "pattern":
            box = synthhr.read_boxes(q["boxes"])[q["target"]]
            hits.append(bool(r["hr_cells"][synthhr.centre_cell(box)]))
    out["centre_cell_selected"] = sum(hits) / len(hits) if hits else 0.0
    out["hr_selected_frac"] = statistics.mean(r["hr_selected_frac"] for r in ok)
    out["tiles_encoded"] = statistics.mean(tiles_of(r["hr_cells"]) for r in ok)
    out["ms_per_image"] = statistics.mean(r["prefill_ms"] + r["decode_ms"] for r in ok)
    out["tflops_per_image"] = statistics.mean(r["tflops"] for r in ok)
    for kind in ("pattern", "count"):
        sel = [r for r in ok if r["question_type"] == kind]
        out[f"{kind}_ms_per_image"] = statistics.mean(r["prefill_ms"] + r["decode_ms"]
                                                     for r in sel)
        out[f"{kind}_tiles_encoded"] = statistics.mean(tiles_of(r["hr_cells"]) for r in sel)
    return out


def markdown(results: dict[str, dict]) -> str:
    f, lo, fu = (results[m] for m in MODES)
    header = ("| mode | pattern acc | count acc | centre cell selected | selected frac | tiles"
              " | ms / image | TFLOPs / image |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for m in MODES:
        r = results[m]
        lines.append(f"| {m} | {r['pattern_accuracy']:.3f} | {r['count_accuracy']:.3f} "
                     f"| {r['centre_cell_selected']:.3f} | {r['hr_selected_frac']:.4f} "
                     f"| {r['tiles_encoded']:.2f} | {r['ms_per_image']:.1f} "
                     f"| {r['tflops_per_image']:.5f} |")
    ratios = (f"flexattn / lowres: {f['ms_per_image'] / lo['ms_per_image']:.2f}x ms, "
              f"{f['tflops_per_image'] / lo['tflops_per_image']:.2f}x TFLOPs; "
              f"fullres / flexattn: {fu['ms_per_image'] / f['ms_per_image']:.2f}x ms, "
              f"{fu['tflops_per_image'] / f['tflops_per_image']:.2f}x TFLOPs")
    lines += ["", ratios]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "synthhr-mini"))
    p.add_argument("--images", type=int, default=200, help="scenes, two questions each")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--work", default="outputs/synthhr-eval", help="set and job outputs")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--overlays", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON to write (a .md beside it)")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    commit = source_commit()
    work = Path(args.work)
    manifest_path = synthhr.write_set(work / "set", args.images, args.seed)
    manifest = {r["id"]: r for r in pq.read_table(manifest_path).to_pylist()}
    results, seconds = {}, {}
    for mode in modes:
        out = work / mode
        started = time.perf_counter()
        argv_job = ["--input", str(manifest_path), "--output", str(out), "--model", args.model,
                    "--mode", mode, "--batch-size", "1", "--overwrite", "--max-new-tokens", "4"]
        if mode == "flexattn" and args.overlays:
            argv_job += ["--save-overlays", str(args.overlays)]
        if score_rsvqa.main(argv_job) != 0:
            raise SystemExit(f"score_rsvqa failed for mode {mode}")
        seconds[mode] = time.perf_counter() - started
        rows = read_output(str(out)).to_pylist()
        results[mode] = summarize(rows, manifest)
    text = markdown(results) if set(MODES) <= set(results) else json.dumps(results, indent=1)
    print(text)
    if args.out:
        write_json(Path(args.out), {"meta": provenance(commit, argv, "bench/synthhr_eval.py"), "set": {"seed": args.seed,
                   "images": args.images, "questions": 2 * args.images},
                   "job_seconds": seconds, "results": results})
        Path(args.out).with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
