"""The SynthHR training curve: pattern and count accuracy against wall time, one line pair per
run folder of ``python -m synthhr.train`` (its ``curve.jsonl``: one evaluation every
``eval_every`` steps, the wall seconds since the run began, resumed time included).

    python bench/synthhr_curve.py runs/mini runs/mini-seed1 --out bench/results/synthhr-curve.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_curve(run: Path) -> list[dict]:
    path = run / "curve.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no curve.jsonl (not a synthhr.train run folder)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(curves: dict[str, list[dict]], out: Path, target: float = 0.95) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for (name, points), colour in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green",
                                                       "tab:red"), strict=False):
        minutes = [p["wall_seconds"] / 60 for p in points]
        ax.plot(minutes, [p["pattern_acc"] for p in points], "-o", ms=3, color=colour,
                label=f"{name}: pattern")
        ax.plot(minutes, [p["count_acc"] for p in points], "--s", ms=3, color=colour,
                label=f"{name}: count")
    ax.axhline(target, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("wall time of the run, minutes (2-core CPU)")
    ax.set_ylabel("accuracy on validation scenes")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("SynthHR mini from scratch: python -m synthhr.train", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (--out of synthhr.train)")
    p.add_argument("--names", default=None, help="comma-separated legend names (default: the"
                   " folder names)")
    p.add_argument("--out", type=Path, default=Path("bench/results/synthhr-curve.png"))
    args = p.parse_args(argv)
    names = args.names.split(",") if args.names else [r.name for r in args.runs]
    if len(names) != len(args.runs):
        p.error(f"--names gives {len(names)} names for {len(args.runs)} runs")
    try:
        curves = {n: read_curve(r) for n, r in zip(names, args.runs, strict=True)}
    except FileNotFoundError as exc:
        p.error(str(exc))
    plot(curves, args.out)
    for name, points in curves.items():
        for pt in points:
            print(f"{name}\tstep {pt['step']}\t{pt['wall_seconds'] / 60:.1f} min\tpattern"
                  f" {pt['pattern_acc']:.3f}\tcount {pt['count_acc']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
