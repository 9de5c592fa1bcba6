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
import dataclasses
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a plain checkout, not pip-installed
    sys.path.insert(0, str(REPO))

from pipeline import CAPTION, JobConfig, run

DEFAULT_INPUT = str(REPO / "samples" / "remote_sensing")
DEFAULT_OUTPUT = "outputs/caption_remote_sensing"


def _gpus(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = JobConfig(input=DEFAULT_INPUT, output=DEFAULT_OUTPUT)
    p = argparse.ArgumentParser(
        prog="caption_remote_sensing.py",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--input", default=DEFAULT_INPUT,
                   help="folder, glob, s3:// or gs:// prefix, image file, or manifest "
                        "(.parquet/.csv/.jsonl with id, image_uri[, question, ground_truth]); "
                        "default: the bundled samples")
    p.add_argument("--output", default=DEFAULT_OUTPUT,
                   help="folder or s3:// / gs:// prefix (default: %(default)s)")
    p.add_argument("--model", default=d.model,
                   help="checkpoint directory, an object-storage URI of one, or 'demo' "
                        "(default: %(default)s)")
    p.add_argument("--vision-tower", default=None,
                   help="CLIP tower directory or URI (default: from the checkpoint's config)")
    p.add_argument("--prompt", default=None,
                   help=f"question per image (default: {CAPTION.default_prompt!r})")
    p.add_argument("--mode", default=d.mode, help="flexattn, lowres or fullres "
                   "(default: %(default)s)")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 "
                   "(default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per generate() call on an actor (default: %(default)s)")
    p.add_argument("--actors", default="1",
                   help="actor pool size MIN[,MAX], autoscaling (default: %(default)s)")
    p.add_argument("--gpus-per-actor", type=_gpus, default="auto",
                   help="GPUs per actor, or 'auto': 1 if the cluster has GPUs, else 0 "
                        "(default: auto)")
    p.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor,
                   help="(default: %(default)s)")
    p.add_argument("--memory-per-actor-gb", type=float, default=d.memory_per_actor_gb,
                   help="host memory reserved per model replica (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="(default: %(default)s)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N inputs in listing order (default: all)")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help="larger images become error rows, a decompression-bomb guard "
                        "(default: %(default)s)")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help="side of the padded square decode produces, the model's "
                        "highres_size (default: %(default)s)")
    p.add_argument("--decode-rows-per-task", type=int, default=d.decode_rows_per_task,
                   help="inputs per CPU decode task (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete previous results under --output instead of resuming")
    p.add_argument("--log-level", default="INFO", help="driver log level (default: %(default)s)")
    return p


def parse_config(argv: list[str] | None = None) -> tuple[JobConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = {f.name for f in dataclasses.fields(JobConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    try:
        config = JobConfig(task=CAPTION, **values)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2 with the message naming the flag
    return config, args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import ray

    if not ray.is_initialized():
        ray.init()  # connects to RAY_ADDRESS when set (ray job submit), else starts a local Ray
    summary = run(config)
    print()
    print(summary.format_table())
    print(f"Parquet and _summary.json under {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
