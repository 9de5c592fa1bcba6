"""Caption remote-sensing imagery with LLaVA-FlexAttn on Ray Data.

Reads images from a folder, glob, object-storage prefix or manifest, decodes them on CPU
tasks, generates on a pool of model actors (one replica each, GPU if there is one), and writes
answers plus per-image selection statistics to Parquet, then a run summary.

    python jobs/caption_remote_sensing.py                       # the demo: samples, tiny model
    ray job submit --working-dir . -- python jobs/caption_remote_sensing.py \\
        --input s3://bucket/tiles/ --output s3://bucket/captions/ \\
        --model s3://bucket/models/llava-v1.5-7b-flexattn --gpus-per-actor 1 --actors 1,8

Remote-sensing scenes (GeoTIFF, COG, JPEG2000, or a STAC ItemCollection / catalogue as --input)
are read with rasterio, windowed; --chip-size cuts them into chips at native resolution, one
row each, with georeferenced columns; the Parquet files are GeoParquet:

    python jobs/caption_remote_sensing.py --input s3://bucket/stac/items.json --asset visual \
        --chip-size 1008 --chip-overlap 64 --output s3://bucket/captions/ --save-scene-maps 2

Rerunning with the same --output skips inputs (or chips) already written; --overwrite starts
fresh.
Without RAY_ADDRESS (as set by `ray job submit`) it starts a local Ray instance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a plain checkout, not pip-installed
    sys.path.insert(0, str(REPO))

from jobs.common import add_raster_arguments, finish, job_config, job_parser, start
from pipeline import CAPTION, JobConfig, run

DEFAULT_INPUT = str(REPO / "samples" / "remote_sensing")
DEFAULT_OUTPUT = "outputs/caption_remote_sensing"


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(
        "caption_remote_sensing.py", __doc__, default_input=DEFAULT_INPUT,
        default_output=DEFAULT_OUTPUT,
        input_help="folder, glob, s3:// or gs:// prefix, image file, manifest "
                   "(.parquet/.csv/.jsonl with id, image_uri[, question, ground_truth]), or "
                   "STAC ItemCollection / catalogue (.json)",
        prompt_help=f"question per image (default: {CAPTION.default_prompt!r})")
    add_raster_arguments(parser)
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[JobConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    return job_config(parser, args, CAPTION), args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(argv)
    start(args)  # logging; Ray from RAY_ADDRESS (ray job submit) or a local instance
    summary = run(config)
    if args.save_scene_maps:
        from pipeline.scenemap import save_scene_maps

        written = save_scene_maps(config.output, args.save_scene_maps,
                                  config.decode_config().raster)
        print(f"{len(written)} scene map(s) under {config.output}/_scenes: "
              + ", ".join(w.rsplit("/", 1)[-1] for w in written))
    status = finish(config, args, summary)
    if config.chip_size is not None:
        print(f"GeoParquet (geopandas.read_parquet) under {config.output}")
    return status


if __name__ == "__main__":
    sys.exit(main())
