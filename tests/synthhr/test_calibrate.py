"""synthhr.calibrate's choice of a threshold from the candidates' validation figures, and what
it writes into a checkpoint."""

from __future__ import annotations

import json

from synthhr.calibrate import choose, write_threshold


def row(threshold, frac, hit=1.0, pattern=0.8):
    return {"threshold": threshold, "frac": frac, "hit": hit, "flexattn_pattern": pattern}


def test_the_lowest_threshold_that_selects_little_enough_wins():
    rows = [row(48, 0.20), row(96, 0.09), row(128, 0.05)]
    assert choose(rows, max_frac=0.10, min_hit=0.95)["chosen"] == 96


def test_a_threshold_that_loses_the_box_or_accuracy_is_never_chosen():
    rows = [row(48, 0.20), row(96, 0.09, hit=0.5), row(128, 0.05, pattern=0.6), row(160, 0.15)]
    choice = choose(rows, max_frac=0.10, min_hit=0.95)
    assert choice["chosen"] == 160 and "selects least" in choice["rule"]
    assert choose([row(48, 0.2, hit=0.1)], 0.1, 0.95)["chosen"] is None


def test_the_choice_is_written_into_the_checkpoint_and_recorded(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"extra": {"threshold": "48"}}))
    (tmp_path / "training.json").write_text(json.dumps({"command": "python -m synthhr.train"}))
    write_threshold(tmp_path, 96.0, {"chosen": 96.0, "command": "python -m synthhr.calibrate"})
    assert json.loads((tmp_path / "config.json").read_text())["extra"]["threshold"] == "96.0"
    training = json.loads((tmp_path / "training.json").read_text())
    assert training["command"] == "python -m synthhr.train"
    assert training["calibration"]["chosen"] == 96.0
