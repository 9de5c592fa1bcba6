"""The SynthHR demo: the trained mini LLaVA-FlexAttn answers questions about fresh SynthHR
scenes through the RSVQA job, once with FlexAttention and once from the 336 px view alone.

    python jobs/synthhr_demo.py                    # make demo

Writes a few scenes (1008 px, 2-4 boxes filled with one-pixel patterns) and their questions
under OUTPUT/set/, runs `jobs/score_rsvqa.py` on them in `flexattn` mode (drawing overlays of
what the model looked at) and in `lowres` mode, then prints each answer beside the truth and
the accuracy per mode and question type. "What pattern is inside the red box?" can only be
answered from the high-resolution cells the model selects; "How many boxes are there?" can be
answered at 336 px.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a plain checkout, not pip-installed
    sys.path.insert(0, str(REPO))

from jobs import score_rsvqa
from pipeline.resume import read_output
from synthhr.task import write_set

DEFAULT_MODEL = str(REPO / "models" / "synthhr-mini")
MODES = ("flexattn", "lowres")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synthhr_demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="(default: %(default)s)")
    p.add_argument("--output", default="outputs/synthhr_demo", help="(default: %(default)s)")
    p.add_argument("--images", type=int, default=8, help="scenes, two questions each"
                   " (default: %(default)s)")
    p.add_argument("--seed", type=int, default=4242, help="SynthHR set seed (default:"
                   " %(default)s; training drew from seed 0)")
    p.add_argument("--overlays", type=int, default=4, help="overlays drawn in flexattn mode"
                   " (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    out = Path(args.output)
    manifest = write_set(out / "set", args.images, args.seed)
    answers: dict[str, dict[str, dict]] = {}
    for mode in MODES:
        flags = ["--input", str(manifest), "--output", str(out / mode), "--model", args.model,
                 "--mode", mode, "--overwrite", "--max-new-tokens", "4"]
        if mode == "flexattn" and args.overlays:
            flags += ["--save-overlays", str(args.overlays)]
        if score_rsvqa.main(flags) != 0:
            return 1
        answers[mode] = {r["id"]: r for r in read_output(str(out / mode)).to_pylist()}
    print_comparison(answers)
    if args.overlays:
        print(f"\nOverlays of the flexattn answers (cells used, last selection map):"
              f" {out / 'flexattn' / '_overlays'}")
    return 0


def print_comparison(answers: dict[str, dict[str, dict]]) -> None:
    """Each question with its truth and both modes' answers, then accuracy per mode."""
    rows = sorted(answers[MODES[0]].values(), key=lambda r: r["id"])
    print(f"\n{'question':<42} {'truth':<8} " + " ".join(f"{m:<10}" for m in MODES))
    for r in rows:
        cells = [answers[m][r["id"]] for m in MODES]
        marks = [f"{(c['answer'] or c['error'] or '')[:8]:<8}{'+' if c['correct'] else '-'} "
                 for c in cells]
        question = r["prompt"].split("\n")[0]
        print(f"{question[:42]:<42} {r['ground_truth']:<8} " + " ".join(marks))
    print()
    for mode in MODES:
        parts = []
        for kind in ("pattern", "count"):
            sel = [c for c in answers[mode].values() if c["question_type"] == kind]
            right = sum(bool(c["correct"]) for c in sel)
            parts.append(f"{kind} {right}/{len(sel)}")
        print(f"{mode:<9} accuracy: " + ", ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
