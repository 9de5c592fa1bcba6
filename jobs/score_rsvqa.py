"""Offline RSVQA scoring with LLaVA-FlexAttn on Ray Data: answer every question, score them.

--input is a folder in the original RSVQA release layout (`<split>_questions.json`,
`<split>_answers.json`, `<split>_images.json`, images as `<img_id>.tif` in `Images_LR/`,
`Images_HR/`, `Data/` or --images; local or object storage) or a plain manifest (id, image
URI, question, answer, type). Each question is asked with "Answer the question using a single
word or phrase."; answers and ground truth are normalised (case, punctuation, articles,
yes/no, number words) and compared; --count-bins maps numeric counts into RSVQA-LR's bins
(0, 1-10, 11-100, 101-1000, >1000) first. One Parquet row per question (question_type,
ground_truth, answer, correct); accuracy per question type, average accuracy (mean of the
types) and overall accuracy are printed and written as OUTPUT/_rsvqa_scores.json and .md.

    python jobs/score_rsvqa.py                    # the demo: samples/rsvqa, tiny model
    ray job submit --working-dir . -- python jobs/score_rsvqa.py \\
        --input s3://bucket/RSVQA_LR/ --split LR_split_test --count-bins \\
        --output s3://bucket/rsvqa-lr-test/ --model s3://bucket/models/7b
"""

from __future__ import annotations

import argparse
import posixpath
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a plain checkout, not pip-installed
    sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq

from jobs.common import finish, job_config, job_parser, start
from pipeline import JobConfig, run
from pipeline.rsvqa import read_questions, rsvqa_task
from pipeline.storage import open_fs, to_uri

DEFAULT_INPUT = str(REPO / "samples" / "rsvqa")
DEFAULT_OUTPUT = "outputs/score_rsvqa"
QUESTIONS_NAME = "_rsvqa_questions.parquet"  # the questions as asked, beside the output


def build_parser() -> argparse.ArgumentParser:
    p = job_parser(
        "score_rsvqa.py", __doc__, default_input=DEFAULT_INPUT, default_output=DEFAULT_OUTPUT,
        input_help="RSVQA release folder (local or s3:// / gs://) or a manifest "
                   "(.parquet/.csv/.jsonl with id, image_uri, question, answer, type)",
        prompt_help=None, max_new_tokens=8,
    )
    p.add_argument("--split", default=None,
                   help="split prefix in the release folder, e.g. LR_split_test or "
                        "USGS_split_test (default: the only one there)")
    p.add_argument("--images", default=None,
                   help="folder of <img_id>.tif images (default: Images_LR/, Images_HR/ or "
                        "Data/ beside the JSON files)")
    p.add_argument("--count-bins", action="store_true",
                   help="compare count answers as RSVQA-LR bins: 0, 1-10, 11-100, 101-1000, "
                        ">1000")
    return p


def write_questions(questions, output: str) -> str:
    """The question table as the run's input manifest, `OUTPUT/_rsvqa_questions.parquet`."""
    fs, root = open_fs(output)
    fs.makedirs(root, exist_ok=True)
    path = posixpath.join(root, QUESTIONS_NAME)
    with fs.open(path, "wb") as f:
        pq.write_table(questions, f)
    return to_uri(fs, path)


def parse_config(argv: list[str] | None = None) -> tuple[JobConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    return job_config(parser, args, rsvqa_task(args.count_bins)), args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(argv)
    try:
        questions = read_questions(config.input, args.split, args.images)
    except (OSError, ValueError) as exc:
        print(f"score_rsvqa.py: error: {exc}", file=sys.stderr)
        return 2
    start(args)
    asked = job_config(build_parser(), args, config.processor.task,
                       input=write_questions(questions, config.output))
    return finish(config, args, run(asked))


if __name__ == "__main__":
    sys.exit(main())
