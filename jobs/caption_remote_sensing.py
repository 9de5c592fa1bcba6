"""Caption remote-sensing imagery with LLaVA-FlexAttn on Ray Data.

Reads images from a folder, glob, object-storage prefix or manifest, decodes them on CPU
tasks, generates on a pool of model actors (one replica each, GPU if there is one), and writes
answers plus per-image selection statistics to Parquet, then a run summary.

    python jobs/caption_remote_sensing.py                       # the demo: samples, tiny model
    ray job submit --working-dir . -- python jobs/caption_remote_sensing.py \\
        --input s3://bucket/tiles/ --output s3://bucket/captions/ \\
        --model s3://bucket/models/llava-v1.5-7b-flexattn --gpus-per-actor 1 --actors 1,8

Rerunning with the same --output skips inputs already written; --overwrite starts fresh.
Without RAY_ADDRESS (as set by `ray job submit`) it starts a local Ray instance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a plain checkout, not pip-installed
    sys.path.insert(0, str(REPO))

from jobs.common import finish, job_config, job_parser, start
from pipeline import CAPTION, JobConfig, run

DEFAULT_INPUT = str(REPO / "samples" / "remote_sensing")
DEFAULT_OUTPUT = "outputs/caption_remote_sensing"


def build_parser() -> argparse.ArgumentParser:
    return job_parser(
        "caption_remote_sensing.py", __doc__, default_input=DEFAULT_INPUT,
        default_output=DEFAULT_OUTPUT,
        input_help="folder, glob, s3:// or gs:// prefix, image file, or manifest "
                   "(.parquet/.csv/.jsonl with id, image_uri[, question, ground_truth])",
        prompt_help=f"question per image (default: {CAPTION.default_prompt!r})")


def parse_config(argv: list[str] | None = None) -> tuple[JobConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    return job_config(parser, args, CAPTION), args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(argv)
    start(args)  # logging; Ray from RAY_ADDRESS (ray job submit) or a local instance
    return finish(config, args, run(config))


if __name__ == "__main__":
    sys.exit(main())
