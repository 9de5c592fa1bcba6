"""Choose a trained SynthHR checkpoint's selection threshold on validation scenes.

    python -m synthhr.calibrate models/synthhr-mini --seed 1 --images 32 --max-frac 0.08

``python -m synthhr.train`` runs it on the model it exports (the config's ``[calibrate]``).

Selection keeps the cells whose min-max normalised attention, times 255, is above
``threshold`` (48 in the published model). Training shapes where the attention goes, not how
peaked it is, so after training the threshold is set once on validation scenes (seed 1, the
scenes the training run evaluates on; never a test seed). Of the candidates whose named box's
centre cell is used in at least ``--min-hit`` of the pattern questions and whose pattern
accuracy is not below the published threshold's, the lowest whose mean selected fraction is
at most ``--max-frac``, else the one that selects least. The choice is written into the checkpoint (``extra.threshold`` in
``config.json``) and recorded, with every candidate's figures and this command, in
``training.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
CANDIDATES = (48.0, 64.0, 80.0, 96.0, 112.0, 128.0, 160.0, 192.0)


def calibrate(folder: Path, seed: int, images: int, max_frac: float, min_hit: float,
              candidates: tuple[float, ...] = CANDIDATES) -> dict:
    """Every candidate's validation figures and the chosen threshold (None if none passes)."""
    from flexattn.loading import load_model

    from .evaluate import evaluate_model

    model = load_model(folder, device="cpu", dtype="float32")
    rows = []
    for threshold in candidates:
        model.configure(threshold=threshold)
        figures = evaluate_model(model, seed, images, modes=("flexattn",))
        rows.append({"threshold": threshold, **figures})
        log.info("threshold %g: %s", threshold, figures)
    return {**choose(rows, max_frac, min_hit), "candidates": rows}


def choose(rows: list[dict], max_frac: float, min_hit: float) -> dict:
    """The threshold to keep from the candidates' figures (``rows`` in increasing threshold,
    the first the published one) and the rule that chose it."""
    floor = rows[0]["flexattn_pattern"]
    keep = [r for r in rows if r["hit"] >= min_hit and r["flexattn_pattern"] >= floor]
    small = [r for r in keep if r["frac"] <= max_frac]
    if small:
        return {"chosen": small[0]["threshold"], "rule": f"lowest with frac <= {max_frac}"}
    if keep:
        best = min(keep, key=lambda r: (r["frac"], r["threshold"]))
        return {"chosen": best["threshold"],
                "rule": f"none reaches frac <= {max_frac}: the one that selects least"}
    return {"chosen": None, "rule": "none keeps the hit rate and the accuracy"}


def write_threshold(folder: Path, threshold: float, record: dict) -> None:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("extra", {})["threshold"] = str(threshold)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    training_path = folder / "training.json"
    training = json.loads(training_path.read_text()) if training_path.is_file() else {}
    training["calibration"] = record
    training_path.write_text(json.dumps(training, indent=2) + "\n")


def calibrate_command(folder: Path, seed: int, images: int, max_frac: float,
                      min_hit: float) -> list[str]:
    """The arguments of this module's command for these settings."""
    return [str(folder), "--seed", str(seed), "--images", str(images), "--max-frac",
            f"{max_frac:g}", "--min-hit", f"{min_hit:g}"]


def run(folder: Path, seed: int, images: int, max_frac: float, min_hit: float,
        words: list[str] | None = None) -> dict:
    """Calibrate ``folder``; write the chosen threshold and the record (with the command,
    ``words`` or the equivalent one) into it, unless no candidate passes. Returns the
    record."""
    t0 = time.perf_counter()
    result = calibrate(folder, seed, images, max_frac, min_hit)
    words = words if words is not None else calibrate_command(folder, seed, images, max_frac,
                                                              min_hit)
    record = {"command": "python -m synthhr.calibrate " + " ".join(map(str, words)),
              "seconds": round(time.perf_counter() - t0, 1), "date": time.strftime("%Y-%m-%d"),
              **result}
    if result["chosen"] is not None:
        write_threshold(folder, result["chosen"], record)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m synthhr.calibrate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a trained checkpoint folder (original layout)")
    p.add_argument("--seed", type=int, default=1, help="validation scenes (default: 1)")
    p.add_argument("--images", type=int, default=32, help="scenes (default: 32)")
    p.add_argument("--max-frac", type=float, default=0.08,
                   help="largest mean selected fraction (default: 0.08)")
    p.add_argument("--min-hit", type=float, default=0.95,
                   help="smallest share of centre cells used (default: 0.95)")
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        p.error(f"model: {args.model} has no config.json")
    if args.images < 1:
        p.error(f"--images must be >= 1, got {args.images}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    words = sys.argv[1:] if argv is None else argv
    record = run(args.model, args.seed, args.images, args.max_frac, args.min_hit, words)
    if record["chosen"] is None:
        print("no candidate threshold passes; the checkpoint is left as it is", file=sys.stderr)
        print(json.dumps(record, indent=1))
        return 1
    print(f"threshold {record['chosen']:g} written to {args.model / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
